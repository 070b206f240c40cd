"""The unit encoder: an image embedding and its caption's embedding -> one `unit` vector (image+caption as one item)."""

from __future__ import annotations

import logging

import numpy as np

from imgtxt.bundle import Bundle
from imgtxt.encoders.session import SessionConfig, create_session

logger = logging.getLogger(__name__)

FALLBACK = "normalize(v+t)"


class UnitEncoder:
    """Makes the `unit` vector of paired image and caption embeddings.

    With the bundle's trained fusion head (an ONNX graph `image`, `text` -> `embedding`), runs it with ONNX
    Runtime; without one, uses `normalize(v + t)`: for unit vectors, the direction halfway between the image and
    the caption, so a unit scores high against queries close to either.

    Args:
        bundle: The loaded bundle, or None for the documented fallback.
        session_config: How the fusion head's session is built (default: CPU, one thread: the head is tiny).
    """

    def __init__(self, bundle: Bundle | None, session_config: SessionConfig | None = None) -> None:
        self.session = None
        if bundle is not None and bundle.manifest.unit is not None:
            spec = bundle.manifest.unit
            cfg = session_config or SessionConfig(device="cpu", intra_op_threads=1)
            self.session = create_session(bundle.file(spec.file), cfg)
            self.inputs = list(spec.inputs)
            self.output = spec.output
        self.kind = "trained" if self.session is not None else FALLBACK
        """Which fusion makes the units: `trained` (the bundle's head) or the `normalize(v+t)` fallback."""

    def fuse(self, image: np.ndarray, text: np.ndarray) -> np.ndarray:
        """(N, D) unit vectors of paired (N, D) image and text embeddings."""
        if len(image) == 0:
            return np.zeros_like(image)
        if self.session is not None:
            feed = dict(zip(self.inputs, (image.astype(np.float32), text.astype(np.float32)), strict=True))
            (out,) = self.session.run([self.output], feed)
            return np.asarray(out, np.float32)
        fused = image + text
        return (fused / np.maximum(np.linalg.norm(fused, axis=1, keepdims=True), 1e-12)).astype(np.float32)
