"""The encode stage: batches of images and texts -> embeddings, in-process (ONNX Runtime) or through the gRPC services.

The pipeline depends only on the small `Encoder` protocol; the gRPC adapter streams each modality through one
long-lived `EncodeStream` call (requests drawn lazily from the read stage, so reading, encoding and writing overlap).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
import numpy as np

from imgtxt.bundle import Bundle
from imgtxt.errors import ImgTxtError
from imgtxt.serving.result import EncodeResult

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class EncodeJob:
    """One batch's work for the encoders."""

    images: list[bytes]
    """Encoded image bytes, in order."""
    texts: list[str]
    """Texts, in order."""


class Encoder(Protocol):
    """What the pipeline needs from an encoder (both towers of one bundle)."""

    dim: int
    """Embedding dimension."""
    bundle_version: str
    """Version of the bundle whose towers encode."""

    def encode_images(self, images: list[bytes]) -> EncodeResult:
        """Embeddings of a batch of images, with one outcome per item (bad items fail alone)."""
        ...

    def encode_texts(self, texts: list[str]) -> EncodeResult:
        """Embeddings of a batch of texts, with one outcome per item."""
        ...

    def close(self) -> None:
        """Releases sessions or channels."""
        ...


def _empty(dim: int) -> EncodeResult:
    return EncodeResult(np.zeros((0, dim), np.float32), [])


def encode_jobs(encoder: Encoder, jobs: Iterable[EncodeJob]) -> Iterator[tuple[EncodeResult, EncodeResult]]:
    """Encodes each job's images and texts, in order; uses the encoder's own streaming path when it has one.

    Without one, the images and texts of a job are encoded concurrently (two towers, two sessions or services).
    """
    stream = getattr(encoder, "encode_jobs", None)
    if stream is not None:
        yield from stream(jobs)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="encode-text") as pool:
        for job in jobs:
            texts = pool.submit(encoder.encode_texts, job.texts) if job.texts else None
            images = encoder.encode_images(job.images) if job.images else _empty(encoder.dim)
            yield images, texts.result() if texts else _empty(encoder.dim)


class InProcessEncoder:
    """Both towers of a bundle run with ONNX Runtime in this process (`--in-process`).

    Args:
        bundle: Bundle directory.
        device: `auto`, `cpu` or `cuda`.
        intra_op_threads: ORT threads per operator (0 = one per core).
    """

    def __init__(self, bundle: str | Path, device: str = "auto", intra_op_threads: int = 0) -> None:
        from image_encoder_service.encoder import ImageEncoder
        from text_encoder_service.encoder import TextEncoder

        self.image = ImageEncoder.from_bundle(bundle, device=device, intra_op_threads=intra_op_threads)
        self.text = TextEncoder.from_bundle(bundle, device=device, intra_op_threads=intra_op_threads, verify=False)
        self.dim = self.image.dim
        self.bundle_version = self.image.bundle.version

    def encode_images(self, images: list[bytes]) -> EncodeResult:
        """Encodes images in-process."""
        return self.image.encode(images)

    def encode_texts(self, texts: list[str]) -> EncodeResult:
        """Encodes texts in-process."""
        return self.text.encode(texts)

    def close(self) -> None:
        """Stops the image preprocessing pool."""
        self.image.close()


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


def _info(client: Any, modality: str) -> Any:
    """The service's Info, or a one-line error naming the service and the gRPC status."""
    try:
        return client.info()
    except grpc.RpcError as exc:
        code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        raise ImgTxtError(f"cannot use the {modality} service at {client.target}: {code}: {details}") from exc


class GrpcEncoder:
    """Encodes through the image and text services, one `EncodeStream` per modality for a whole job.

    Args:
        image_target: `host:port` of the image service.
        text_target: `host:port` of the text service.
        token: Bearer token, when the services require one.
        timeout: Deadline of unary calls (Info, Encode), in seconds.
        chunk_size: Items per streamed request (capped at the services' max_batch).
    """

    def __init__(
        self, image_target: str, text_target: str, token: str | None = None, timeout: float = 30.0, chunk_size: int = 0
    ) -> None:
        from imgtxt.client import ImageEncoderClient, TextEncoderClient

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

    def encode_images(self, images: list[bytes]) -> EncodeResult:
        """Encodes images with unary calls (for queries)."""
        return self.image.encode(images)

    def encode_texts(self, texts: list[str]) -> EncodeResult:
        """Encodes texts with unary calls (for queries)."""
        return self.text.encode(texts)

    def _stream(self, client: Any, lists: Iterator[Sequence[T]]) -> Iterator[EncodeResult]:
        sizes: deque[int] = deque()

        def items() -> Iterator[T]:
            for lst in lists:
                sizes.append(len(lst))
                yield from lst

        return _recut(client.encode_stream(items(), self.chunk_size), sizes, self.dim)

    def encode_jobs(self, jobs: Iterable[EncodeJob]) -> Iterator[tuple[EncodeResult, EncodeResult]]:
        """Streams the jobs' images and texts through both services at once, yielding per-job results in order.

        gRPC draws the image requests from `jobs` on its own thread; each job's texts are handed to the text
        stream through an (unbounded, but small: texts only) queue, so neither stream waits for the other's reader.
        """
        text_lists: queue.Queue[list[str] | None] = queue.Queue()
        finished = threading.Event()  # set when this generator ends, even on error: frees the text request thread

        def image_lists() -> Iterator[list[bytes]]:
            try:
                for job in jobs:
                    text_lists.put(job.texts)
                    yield job.images
            finally:
                text_lists.put(None)

        def texts() -> Iterator[list[str]]:
            while not finished.is_set():
                try:
                    lst = text_lists.get(timeout=0.5)
                except queue.Empty:
                    continue
                if lst is None:
                    return
                yield lst

        try:
            image_results = self._stream(self.image, image_lists())
            text_results = self._stream(self.text, texts())
            yield from zip(image_results, text_results, strict=True)
        finally:
            finished.set()

    def close(self) -> None:
        """Closes both channels."""
        self.image.close()
        self.text.close()


class UnitFusion:
    """Makes the `unit` vector of an image and its caption.

    With the bundle's trained fusion head (an ONNX graph `image`, `text` -> `embedding`), runs it with ONNX
    Runtime; without one, uses `normalize(v + t)`: for unit vectors, the direction halfway between the image and
    the caption, so a unit scores high against queries close to either.

    Args:
        bundle: The loaded bundle, or None for the documented fallback.
    """

    def __init__(self, bundle: Bundle | None) -> None:
        self.session: Any = None
        if bundle is not None and bundle.manifest.unit is not None:
            from imgtxt.serving.session import SessionConfig, create_session

            spec = bundle.manifest.unit
            self.session = create_session(bundle.file(spec.file), SessionConfig(device="cpu", intra_op_threads=1))
            self.output = spec.output
        self.kind = "trained" if self.session is not None else "normalize(v+t)"

    def fuse(self, image: np.ndarray, text: np.ndarray) -> np.ndarray:
        """(N, D) unit vectors of paired (N, D) image and text embeddings."""
        if len(image) == 0:
            return np.zeros_like(image)
        if self.session is not None:
            (out,) = self.session.run(
                [self.output], {"image": image.astype(np.float32), "text": text.astype(np.float32)}
            )
            return np.asarray(out, np.float32)
        fused = image + text
        return (fused / np.maximum(np.linalg.norm(fused, axis=1, keepdims=True), 1e-12)).astype(np.float32)
