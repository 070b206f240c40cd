"""Both towers of a bundle (and its unit head) in this process: the in-process `Encoder` of indexing, search, eval."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Self

import numpy as np

from imgtxt.bundle import Bundle, load_bundle
from imgtxt.encoders.image import ImageEncoder
from imgtxt.encoders.session import SessionConfig, default_cache_dir
from imgtxt.encoders.text import TextEncoder
from imgtxt.encoders.types import EncodeJob, EncodeResult
from imgtxt.encoders.unit import UnitEncoder
from imgtxt.preprocess import ImageLimits


class BundleEncoder:
    """The image and text towers of one bundle, each behind its own ONNX Runtime session; thread-safe.

    Example:
        >>> with BundleEncoder.from_bundle("bundles/v1", SessionConfig(device="cpu")) as enc:
        ...     enc.encode_texts(["a dog on a beach"]).embeddings.shape
        (1, 512)
    """

    def __init__(self, image: ImageEncoder, text: TextEncoder, unit: UnitEncoder | None = None) -> None:
        if (image.bundle.sha256, image.dim) != (text.bundle.sha256, text.dim):
            raise ValueError("the image and text encoders must serve the same bundle")
        self.image = image
        self.text = text
        self.bundle: Bundle = image.bundle
        self.unit = unit or UnitEncoder(self.bundle)
        self.dim = image.dim
        self.bundle_version = self.bundle.version
        self.identity = self.bundle.identity

    @classmethod
    def from_bundle(
        cls,
        bundle: str | Path | Bundle,
        session_config: SessionConfig | None = None,
        *,
        verify: bool = True,
        limits: ImageLimits | None = None,
        precision: str = "fp32",
    ) -> Self:
        """Loads (and verifies) a bundle and opens a session on each tower.

        Args:
            bundle: Bundle directory, or an already loaded bundle.
            session_config: Device, threads and cache of both sessions (default `SessionConfig()`: CUDA when it
                loads, else CPU; optimised graphs cached in the user cache directory).
            verify: Check the bundle's file hashes (when `bundle` is a path).
            limits: Image byte and pixel limits.
            precision: Graphs to run (`fp32`, `fp16`, `auto`; see `TowerEncoder.from_session_config`).

        Raises:
            BundleError: Bad bundle.
            DeviceUnavailable: `device="cuda"` and CUDA is not usable.
        """
        loaded = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, verify=verify)
        cfg = session_config or SessionConfig(cache_dir=default_cache_dir())
        image = ImageEncoder.from_session_config(loaded, cfg, precision, limits=limits)
        text = TextEncoder.from_session_config(loaded, cfg, precision)
        return cls(image, text)

    def encode_images(self, images: Sequence[bytes]) -> EncodeResult:
        """Encodes images (file bytes) in-process."""
        return self.image.encode(images)

    def encode_texts(self, texts: Sequence[str]) -> EncodeResult:
        """Encodes texts in-process."""
        return self.text.encode(texts)

    def encode_jobs(self, jobs: Iterable[EncodeJob]) -> Iterator[tuple[EncodeResult, EncodeResult]]:
        """Encodes each job's images and texts, in order; a job's two towers run concurrently (two sessions)."""
        with ThreadPoolExecutor(1, thread_name_prefix="encode-text") as pool:
            for job in jobs:
                texts = pool.submit(self.encode_texts, job.texts) if job.texts else None
                images = self.encode_images(job.images) if job.images else _empty(self.dim)
                yield images, texts.result() if texts else _empty(self.dim)

    def limits(self) -> dict[str, int]:
        """Per-item limits of both towers."""
        return {**self.image.limits(), **self.text.limits()}

    def close(self) -> None:
        """Stops the image preprocessing threads."""
        self.image.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _empty(dim: int) -> EncodeResult:
    return EncodeResult(np.zeros((0, dim), np.float32), [])
