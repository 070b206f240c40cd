"""Encoding whole lists of items in bounded chunks: a split's image files and captions through a bundle's towers.

Shared by offline evaluation, the export's int8 retrieval check and the benchmarks (no torch, no gRPC).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from tqdm import tqdm

from imgtxt.encoders.bundle import BundleEncoder
from imgtxt.encoders.session import SessionConfig, default_cache_dir
from imgtxt.encoders.types import EncodeResult
from imgtxt.errors import ImgTxtError

T = TypeVar("T")


def encode_all(
    encode: Callable[[list[T]], EncodeResult], items: Sequence[T], chunk: int = 256, desc: str | None = None
) -> np.ndarray:
    """(n, D) embeddings of `items`, encoded `chunk` at a time (bounded memory), with a progress bar when `desc`.

    Raises:
        ImgTxtError: Any item failed to encode (an evaluation must cover the whole split).
    """
    parts: list[EncodeResult] = []
    for start in tqdm(range(0, len(items), chunk), desc=desc, unit="batch", leave=False, disable=desc is None):
        parts.append(encode(list(items[start : start + chunk])))
    bad = [o.message for p in parts for o in p.outcomes if not o.ok]
    if bad:
        raise ImgTxtError(f"{len(bad)} evaluation items failed to encode, e.g. {bad[0]}")
    return np.concatenate([p.embeddings for p in parts]) if parts else np.zeros((0, 0), np.float32)


def encode_with_bundle(
    bundle_dir: Path,
    image_paths: list[Path],
    captions: list[str],
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "fp32",
) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Encodes image files and captions with a bundle's towers through the serving preprocessing (no torch).

    Args:
        bundle_dir: The bundle.
        image_paths: Image files, in order.
        captions: Captions, in order.
        batch_size: Images per encoding batch (captions: 4x as many).
        device: ONNX Runtime device.
        precision: Graphs to run (`fp32`, `fp16`, `int8`, or `auto`, decided per tower as the services decide).

    Returns:
        Image and caption embeddings, and the precision each tower ran at (`image`, `text`).
    """
    cfg = SessionConfig(device=device, cache_dir=default_cache_dir())
    with BundleEncoder.from_bundle(bundle_dir, cfg, precision=precision) as enc:
        images = encode_all(
            lambda ps: enc.encode_images([p.read_bytes() for p in ps]), image_paths, batch_size, "images"
        )
        texts = encode_all(enc.encode_texts, captions, batch_size * 4, "captions")
        served = {"image": enc.image.precision, "text": enc.text.precision}
    return images, texts, served
