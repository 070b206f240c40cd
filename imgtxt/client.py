"""Clients of the encoder services: numpy in/out, deadlines, retries on UNAVAILABLE, streaming for bulk jobs.

`ImageEncoderClient` / `TextEncoderClient` speak to one service each; `ServiceEncoder` joins both into the
`imgtxt.encoders.types.Encoder` of indexing, search and evaluation. Imports no ONNX Runtime and no torch.

Example:
    >>> with TextEncoderClient("localhost:50052") as client:
    ...     result = client.encode(["a dog on a beach"])
    ...     result.embeddings.shape
    (1, 512)
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Generic, Self, TypeVar

import grpc

from imgtxt.encoders.types import EncodeJob, EncodeResult
from imgtxt.errors import ImgTxtError
from imgtxt.stages import Channel
from imgtxt.v1 import encoder_pb2 as pb
from imgtxt.v1 import encoder_pb2_grpc as pb_grpc
from imgtxt.wire import DEFAULT_MAX_MESSAGE_BYTES, from_response

logger = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
T = TypeVar("T")

# Room for the protobuf framing around a chunk of items.
_MESSAGE_OVERHEAD = 64 * 1024


class _EncoderClient(Generic[ItemT]):
    """What both clients share; subclasses name the stub and how one item becomes a request item."""

    _stub_class: ClassVar[Any]
    _request_class: ClassVar[Any]

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls_ca: str | Path | bytes | None = None,
        tls: bool = False,
        timeout: float = 30.0,
        stream_timeout: float | None = None,
        max_retries: int = 4,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """Opens a channel (connection happens lazily, on the first call).

        Args:
            target: `host:port` of the service.
            token: Bearer token sent as `authorization` metadata when the server requires one.
            tls_ca: PEM root certificate(s) (path or bytes) to verify the server with; implies TLS.
            tls: Use TLS with the system's root certificates (when no `tls_ca` is given).
            timeout: Deadline of each unary call, in seconds.
            stream_timeout: Deadline of a whole `encode_stream` call (None = none; a bulk job may run for hours).
            max_retries: Retries of a unary call answered UNAVAILABLE (exponential backoff from 0.1 s).
            max_message_bytes: Largest message sent or received; match the server's `--max-message-bytes`.
            channel_options: Extra gRPC channel options.
        """
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 60_000),
            *channel_options,
        ]
        if tls_ca is not None or tls:
            ca = Path(tls_ca).read_bytes() if isinstance(tls_ca, str | Path) else tls_ca
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca), options)
        else:
            self._channel = grpc.insecure_channel(target, options)
        self._stub = self._stub_class(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.target = target
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.max_retries = max_retries
        self.max_message_bytes = max_message_bytes
        self._info: pb.InfoResponse | None = None

    def _with_retries(self, call: Callable[[], T]) -> T:
        """Runs a unary call, retrying only UNAVAILABLE (server restarting, connection refused) with backoff."""
        for attempt in range(self.max_retries + 1):
            try:
                return call()
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.max_retries:
                    raise
                delay = min(0.1 * 2**attempt, 2.0)
                logger.info("retrying after UNAVAILABLE", extra={"target": self.target, "attempt": attempt + 1})
                time.sleep(delay)
        raise AssertionError("unreachable")

    def info(self, refresh: bool = False) -> pb.InfoResponse:
        """The service's bundle, dimension, execution provider and limits (cached after the first call)."""
        if self._info is None or refresh:
            self._info = self._with_retries(
                lambda: self._stub.Info(pb.InfoRequest(), timeout=self.timeout, metadata=self._metadata)
            )
        return self._info

    def _item(self, item: ItemT, item_id: str) -> Any:
        raise NotImplementedError

    def _item_bytes(self, item: ItemT) -> int:
        raise NotImplementedError

    def _chunks(self, items: Iterable[ItemT], chunk_size: int) -> Iterator[list[ItemT]]:
        """Groups items into chunks of at most `chunk_size` items that also fit in one message of either side."""
        limit = min(self.max_message_bytes, self.info().limits.max_message_bytes or self.max_message_bytes)
        budget = max(limit - _MESSAGE_OVERHEAD, limit // 2)
        chunk: list[ItemT] = []
        size = 0
        for item in items:
            n = self._item_bytes(item)
            if chunk and (len(chunk) >= chunk_size or size + n > budget):
                yield chunk
                chunk, size = [], 0
            chunk.append(item)
            size += n
        if chunk:
            yield chunk

    def _request(self, items: Sequence[ItemT]) -> Any:
        return self._request_class(items=[self._item(it, "") for it in items])

    def encode(self, items: Sequence[ItemT]) -> EncodeResult:
        """Encodes items with unary calls of at most the server's `max_batch` items each.

        Returns:
            Embeddings (N, D) float32 in item order (zero rows for failed items) and one outcome per item.

        Raises:
            grpc.RpcError: A whole call failed (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAUTHENTICATED, ...).
        """
        info = self.info()
        parts: list[EncodeResult] = []
        offset = 0
        for chunk in self._chunks(items, info.limits.max_batch):
            request = self._request(chunk)
            call = partial(self._stub.Encode, request, timeout=self.timeout, metadata=self._metadata)
            parts.append(from_response(self._with_retries(call), offset))
            offset += len(chunk)
        return EncodeResult.concat(parts, info.dim)

    def encode_stream(self, items: Iterable[ItemT], chunk_size: int | None = None) -> Iterator[EncodeResult]:
        """Streams items through `EncodeStream`, yielding one result per chunk, in order.

        Items are read lazily from `items` as the server keeps up (gRPC flow control), so arbitrarily long inputs
        stream in bounded memory. Streams are not retried: on an error, resume from the last chunk received.

        Args:
            items: Images (bytes) or texts, any iterable.
            chunk_size: Items per chunk (default and maximum: the server's `max_batch`).

        Raises:
            grpc.RpcError: The stream failed.
        """
        max_batch = self.info().limits.max_batch
        size = min(chunk_size or max_batch, max_batch)
        requests = (self._request(chunk) for chunk in self._chunks(items, size))
        offset = 0  # per-item messages name the item by its position in the whole input
        for response in self._stub.EncodeStream(requests, timeout=self.stream_timeout, metadata=self._metadata):
            yield from_response(response, offset)
            offset += len(response.results)

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ImageEncoderClient(_EncoderClient[bytes]):
    """Client of `imgtxt.v1.ImageEncoder`: encoded image bytes in, numpy embeddings out."""

    _stub_class = pb_grpc.ImageEncoderStub
    _request_class = pb.EncodeImagesRequest

    def _item(self, item: bytes, item_id: str) -> pb.ImageItem:
        return pb.ImageItem(id=item_id, data=item)

    def _item_bytes(self, item: bytes) -> int:
        return len(item) + 16


class TextEncoderClient(_EncoderClient[str]):
    """Client of `imgtxt.v1.TextEncoder`: strings in, numpy embeddings out."""

    _stub_class = pb_grpc.TextEncoderStub
    _request_class = pb.EncodeTextsRequest

    def _item(self, item: str, item_id: str) -> pb.TextItem:
        return pb.TextItem(id=item_id, text=item)

    def _item_bytes(self, item: str) -> int:
        return 4 * len(item) + 16


def _recut(results: Iterator[EncodeResult], sizes: deque[int], dim: int) -> Iterator[EncodeResult]:
    """Re-cuts a stream of per-chunk results at job boundaries (`sizes` is filled as jobs are sent)."""
    parts: list[EncodeResult] = []
    have = 0

    def take(n: int) -> EncodeResult:
        nonlocal parts, have
        joined = EncodeResult.concat(parts, dim)
        head = EncodeResult(joined.embeddings[:n], joined.outcomes[:n])
        rest = EncodeResult(joined.embeddings[n:], joined.outcomes[n:])
        parts, have = ([rest] if len(rest) else []), have - n
        return head

    for res in results:
        parts.append(res)
        have += len(res)
        while sizes and sizes[0] <= have:
            yield take(sizes.popleft())
    while sizes:  # trailing jobs with nothing to encode
        yield take(sizes.popleft())


def _info(client: _EncoderClient[Any], modality: str) -> pb.InfoResponse:
    """The service's Info, or a one-line error naming the service and the gRPC status."""
    try:
        return client.info()
    except grpc.RpcError as exc:
        code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        raise ImgTxtError(f"cannot use the {modality} service at {client.target}: {code}: {details}") from exc


class ServiceEncoder:
    """Both encoder services as one `Encoder`: unary calls for queries, one `EncodeStream` per modality for a job.

    Args:
        image_target: `host:port` of the image service.
        text_target: `host:port` of the text service.
        token: Bearer token, when the services require one.
        timeout: Deadline of unary calls (Info, Encode), in seconds.
        chunk_size: Items per streamed request (capped at the services' max_batch).

    Raises:
        ImgTxtError: A service cannot be reached.
        ValueError: The two services serve different bundles.
    """

    def __init__(
        self, image_target: str, text_target: str, token: str | None = None, timeout: float = 30.0, chunk_size: int = 0
    ) -> None:
        self.image = ImageEncoderClient(image_target, token=token, timeout=timeout)
        self.text = TextEncoderClient(text_target, token=token, timeout=timeout)
        image_info, text_info = _info(self.image, "image"), _info(self.text, "text")
        if (image_info.bundle_version, image_info.dim) != (text_info.bundle_version, text_info.dim):
            raise ValueError(
                f"the services serve different bundles: image {image_info.bundle_version} (dim {image_info.dim}), "
                f"text {text_info.bundle_version} (dim {text_info.dim})"
            )
        self.dim = int(image_info.dim)
        self.bundle_version = str(image_info.bundle_version)
        self.chunk_size = chunk_size or None

    def encode_images(self, images: Sequence[bytes]) -> EncodeResult:
        """Encodes images with unary calls (for queries)."""
        return self.image.encode(images)

    def encode_texts(self, texts: Sequence[str]) -> EncodeResult:
        """Encodes texts with unary calls (for queries)."""
        return self.text.encode(texts)

    def _stream(self, client: _EncoderClient[T], lists: Iterable[Sequence[T]]) -> Iterator[EncodeResult]:
        sizes: deque[int] = deque()

        def items() -> Iterator[T]:
            for lst in lists:
                sizes.append(len(lst))
                yield from lst

        return _recut(client.encode_stream(items(), self.chunk_size), sizes, self.dim)

    def encode_jobs(self, jobs: Iterable[EncodeJob]) -> Iterator[tuple[EncodeResult, EncodeResult]]:
        """Streams every job's images and texts through the two services concurrently; yields per job, in order.

        gRPC draws the image requests from `jobs` on its own thread; each job's texts are handed to the text
        stream through a channel (unbounded, but small: texts only), so neither stream waits for the other's reader.
        """
        text_lists: Channel[list[str]] = Channel()

        def image_lists() -> Iterator[list[bytes]]:
            try:
                for job in jobs:
                    text_lists.put(job.texts)
                    yield job.images
            except BaseException as exc:
                text_lists.close(exc)
                raise
            else:
                text_lists.close()

        try:
            image_results = self._stream(self.image, image_lists())
            text_results = self._stream(self.text, text_lists)
            yield from zip(image_results, text_results, strict=True)
        finally:
            text_lists.cancel()  # ends the text request thread, even on error

    def close(self) -> None:
        """Closes both channels."""
        self.image.close()
        self.text.close()
