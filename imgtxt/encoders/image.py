"""The image tower as a domain object: image bytes -> shared preprocessing -> ONNX Runtime -> embeddings (no gRPC)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
from PIL import Image

from imgtxt.bundle import Bundle
from imgtxt.encoders.session import available_cores
from imgtxt.encoders.tower import Prepared, TowerEncoder
from imgtxt.encoders.types import ItemOutcome
from imgtxt.errors import InvalidInput, LimitExceeded
from imgtxt.preprocess import ImageLimits, preprocess_image


class ImageEncoder(TowerEncoder[bytes, np.ndarray]):
    """Encodes images (encoded file bytes, never URLs) with a bundle's image tower; thread-safe.

    Example:
        >>> enc = ImageEncoder.from_bundle("bundles/v1", device="cpu")
        >>> result = enc.encode([open("cat.jpg", "rb").read()])
        >>> result.embeddings.shape, result.outcomes[0].ok
        ((1, 512), True)
    """

    modality = "image"

    def __init__(
        self,
        bundle: Bundle,
        session: ort.InferenceSession,
        limits: ImageLimits | None = None,
        preprocess_threads: int = 0,
    ) -> None:
        """Wraps an open session on the bundle's image tower.

        Args:
            bundle: The loaded bundle (its manifest gives the preprocessing).
            session: Session on the image tower.
            limits: Byte and pixel limits applied to every image before decoding (default `ImageLimits()`).
            preprocess_threads: Threads decoding the images of one call in parallel (0 = one per core, 1 = inline).
        """
        super().__init__(bundle, session)
        self.preprocess_config = bundle.manifest.image_preprocess
        self.image_limits = limits or ImageLimits()
        threads = preprocess_threads or available_cores()
        # Decoding and resizing in Pillow release the GIL, so a pool speeds up large batches on several cores.
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="preprocess") if threads > 1 else None

    def limits(self) -> dict[str, int]:
        """Byte and pixel limits."""
        return {
            "max_image_bytes": self.image_limits.max_image_bytes,
            "max_image_pixels": self.image_limits.max_image_pixels,
        }

    def _prepare_one(self, data: bytes) -> np.ndarray | InvalidInput | LimitExceeded:
        try:
            return preprocess_image(data, self.preprocess_config, self.image_limits)
        except (InvalidInput, LimitExceeded) as exc:
            return exc

    def prepare(self, items: Sequence[bytes]) -> Prepared[np.ndarray]:
        """Decodes and preprocesses each image with the shared `imgtxt.preprocess` module."""
        if self._pool is not None and len(items) > 1:
            done = list(self._pool.map(self._prepare_one, items))
        else:
            done = [self._prepare_one(data) for data in items]
        features: list[np.ndarray | None] = []
        outcomes: list[ItemOutcome] = []
        for i, res in enumerate(done):
            if isinstance(res, np.ndarray):
                features.append(res)
                outcomes.append(ItemOutcome())
            else:
                features.append(None)
                outcomes.append(ItemOutcome.from_error(i, res))
        return Prepared(features, outcomes)

    def collate(self, features: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Stacks (3, H, W) arrays into the (N, 3, H, W) pixel input."""
        return {self.spec.inputs[0]: np.stack(features)}

    def warm_up_items(self) -> list[bytes]:
        """Two small PNGs (a batch of 2 exercises the batched code path)."""
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (120, 90, 200)).save(buf, format="PNG")
        return [buf.getvalue()] * 2

    def close(self) -> None:
        """Stops the preprocessing threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
