"""Clients of the encoder services: numpy in/out, deadlines, gRPC retry policy, streaming for bulk jobs.

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
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, Self, TypeVar

import grpc

from imgtxt.bundle import BundleIdentity
from imgtxt.connection import ConnectionConfig
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
        target: str | ConnectionConfig,
        *,
        token: str | None = None,
        tls_ca: str | Path | None = None,
        tls: bool = False,
        timeout: float = 30.0,
        stream_timeout: float | None = None,
        max_retries: int = 4,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """Opens a channel (connection happens lazily, on the first call).

        Args:
            target: A `ConnectionConfig`, or the service's `host:port` with the keyword arguments below.
            token: Bearer token sent as `authorization` metadata when the server requires one.
            tls_ca: PEM root certificate(s) (a path) to verify the server with; implies TLS.
            tls: Use TLS with the system's root certificates (when no `tls_ca` is given).
            timeout: Deadline of each unary call, retries included, in seconds.
            stream_timeout: Deadline of a whole `encode_stream` call (None = none; a bulk job may run for hours).
            max_retries: Retries (gRPC's retry policy) of a call answered UNAVAILABLE or RESOURCE_EXHAUSTED.
            max_message_bytes: Largest message sent or received; match the server's `--max-message-bytes`.
            channel_options: Extra gRPC channel options.
        """
        if isinstance(target, str):
            target = ConnectionConfig(
                target,
                tls=tls,
                tls_ca=Path(tls_ca) if tls_ca is not None else None,
                token=token,
                timeout_s=timeout,
                retries=max_retries,
                max_message_bytes=max_message_bytes,
            )
        self.config = target
        self._channel = target.channel(channel_options)
        self._stub = self._stub_class(self._channel)
        self._metadata = target.metadata
        self.target = target.address
        self.timeout = target.timeout_s
        self.stream_timeout = stream_timeout
        self.max_message_bytes = target.max_message_bytes
        self._info: pb.InfoResponse | None = None

    def info(self, refresh: bool = False) -> pb.InfoResponse:
        """The service's bundle, dimension, execution provider and limits (cached after the first call)."""
        if self._info is None or refresh:
            self._info = self._stub.Info(pb.InfoRequest(), timeout=self.timeout, metadata=self._metadata)
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
            response = self._stub.Encode(request, timeout=self.timeout, metadata=self._metadata)
            parts.append(from_response(response, offset))
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


C = TypeVar("C")
IMAGE_LIMITS = ("max_image_bytes", "max_image_pixels")
TEXT_LIMITS = ("max_tokens", "max_text_chars")


def _given(client: C | None, modality: str) -> C:
    if client is None:
        raise ImgTxtError(
            f"this command needs the {modality} encoder service, but none was given (--{modality}-service)"
        )
    return client


class ServiceEncoder:
    """The encoder services as one `Encoder`: unary calls for queries, one `EncodeStream` per modality for a job.

    Connects only to the services it is given: a text search passes only the text service, an image-only index
    only the image service. With both, they must serve the same bundle.

    Args:
        image: The image service (`ConnectionConfig`, or `host:port` with `token`/`timeout`), or None.
        text: The text service, or None.
        token: Bearer token, for addresses given as strings.
        timeout: Deadline of unary calls (Info, Encode), in seconds, for addresses given as strings.
        chunk_size: Items per streamed request (capped at the services' max_batch).

    Raises:
        ImgTxtError: A service cannot be reached (naming it and the gRPC status).
        ValueError: No service given, or the two serve different bundles.
    """

    def __init__(
        self,
        image: str | ConnectionConfig | None,
        text: str | ConnectionConfig | None,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        chunk_size: int = 0,
    ) -> None:
        def config(c: str | ConnectionConfig | None) -> ConnectionConfig | None:
            return ConnectionConfig(c, token=token, timeout_s=timeout) if isinstance(c, str) else c

        image_cfg, text_cfg = config(image), config(text)
        if image_cfg is None and text_cfg is None:
            raise ValueError("ServiceEncoder needs the image service, the text service, or both")
        self._image = ImageEncoderClient(image_cfg) if image_cfg else None
        self._text = TextEncoderClient(text_cfg) if text_cfg else None
        infos = {m: _info(c, m) for m, c in (("image", self._image), ("text", self._text)) if c is not None}
        served = {(i.bundle_version, i.dim) for i in infos.values()}
        if len(served) > 1:
            raise ValueError(
                "the services serve different bundles: "
                + ", ".join(f"{m} {i.bundle_version} (dim {i.dim})" for m, i in infos.items())
            )
        first = next(iter(infos.values()))
        self.dim = int(first.dim)
        self.bundle_version = str(first.bundle_version)
        # Quantisation and unit head come from the services' Info (empty from servers older than those fields).
        self.identity = BundleIdentity(
            self.bundle_version,
            str(first.bundle_sha256),
            self.dim,
            str(first.distance),
            str(first.quantization),
            str(first.unit_head),
        )
        self.chunk_size = chunk_size or None

    @property
    def image(self) -> ImageEncoderClient:
        """The image service's client (ImgTxtError when this encoder was not given the image service)."""
        return _given(self._image, "image")

    @property
    def text(self) -> TextEncoderClient:
        """The text service's client (ImgTxtError when this encoder was not given the text service)."""
        return _given(self._text, "text")

    def encode_images(self, images: Sequence[bytes]) -> EncodeResult:
        """Encodes images with unary calls (for queries)."""
        return self.image.encode(images)

    def limits(self) -> dict[str, int]:
        """Per-item limits the connected services report (`Info`)."""
        out: dict[str, int] = {}
        for client, names in ((self._image, IMAGE_LIMITS), (self._text, TEXT_LIMITS)):
            if client is not None:
                limits = client.info().limits
                out.update({n: int(getattr(limits, n)) for n in names})
        return out

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
        """Streams every job's images and texts through the services concurrently; yields per job, in order.

        gRPC draws the image requests from `jobs` on its own thread; each job's texts are handed to the text
        stream through a channel (unbounded, but small: texts only), so neither stream waits for the other's reader.
        With one service only, jobs must hold nothing for the other (an error names the missing service).
        """
        if self._image is None or self._text is None:
            yield from self._encode_jobs_one(jobs)
            return
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
            image_results = self._stream(self._image, image_lists())
            text_results = self._stream(self._text, text_lists)
            yield from zip(image_results, text_results, strict=True)
        finally:
            text_lists.cancel()  # ends the text request thread, even on error

    def _encode_jobs_one(self, jobs: Iterable[EncodeJob]) -> Iterator[tuple[EncodeResult, EncodeResult]]:
        """`encode_jobs` with one service: the other modality's items must be empty."""
        empty = EncodeResult.concat([], self.dim)
        images = self._text is None
        failed: list[BaseException] = []

        def lists() -> Iterator[Sequence[Any]]:
            try:
                for job in jobs:
                    if job.texts if images else job.images:
                        raise ImgTxtError(
                            f"this job has {'texts' if images else 'images'} to encode, but only the "
                            f"{'image' if images else 'text'} encoder service was given"
                        )
                    yield job.images if images else job.texts
            except BaseException as exc:  # gRPC reports a failing request iterator as CANCELLED: keep the cause
                failed.append(exc)
                raise

        client: _EncoderClient[Any] = self.image if images else self.text
        try:
            for res in self._stream(client, lists()):
                yield (res, empty) if images else (empty, res)
        except grpc.RpcError:
            if failed:
                raise failed[0] from None
            raise

    def close(self) -> None:
        """Closes the channels."""
        for client in (self._image, self._text):
            if client is not None:
                client.close()
