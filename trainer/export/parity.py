"""Inputs that export parity is measured on: images through the serving decode path, captions of varied lengths."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from imgtxt.preprocess import ImagePreprocessConfig, preprocess_image
from imgtxt.text import TextConfig, TextTokenizer

PARITY_CAPTIONS = (
    "A dog runs across the grass.",
    "Two children in red jackets are playing in the snow near a wooden fence .",
    "a man",
    "A woman rides a bicycle down a busy city street while people watch from the sidewalk cafe on the corner .",
    "Surfer on a big wave",
    "Several people stand on a rocky hill looking at the mountains in the distance .",
)


def _synthetic_jpegs(count: int, seed: int) -> list[bytes]:
    """Varied photo-like test images (gradients, blocks, noise, odd sizes) as JPEG bytes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        h, w = int(rng.integers(120, 400)), int(rng.integers(120, 400))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=-1) * 255 * rng.uniform(0.3, 1.0, 3)
        noise = rng.normal(0, 20 * (i % 3), (h, w, 3))
        img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def parity_image_inputs(cfg: ImagePreprocessConfig, images: Sequence[Path] = (), count: int = 6) -> np.ndarray:
    """Image tower inputs for parity checks, through the serving preprocessing path: given files, else synthetic."""
    data = [p.read_bytes() for p in images][:count] or _synthetic_jpegs(count, seed=0)
    return np.stack([preprocess_image(d, cfg) for d in data])


def parity_text_inputs(tokenizer_file: Path, cfg: TextConfig) -> tuple[np.ndarray, np.ndarray]:
    """Tokenized captions of varied lengths for parity checks."""
    batch = TextTokenizer.from_file(tokenizer_file, cfg).encode(list(PARITY_CAPTIONS))
    return batch.input_ids, batch.attention_mask
