"""Encoding a split for offline evaluation: a bundle through the encoder layer (ONNX Runtime), or a checkpoint (torch).

Both return L2-normalised (n_images, D) and (n_texts, D) embeddings; the metrics come from `imgtxt.retrieval_metrics`
either way, and through the index (`evaluation.via_index`) as well.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from tqdm import tqdm

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
    from imgtxt.encoders.bundle import BundleEncoder
    from imgtxt.encoders.session import SessionConfig, default_cache_dir

    cfg = SessionConfig(device=device, cache_dir=default_cache_dir())
    with BundleEncoder.from_bundle(bundle_dir, cfg, precision=precision) as enc:
        images = encode_all(
            lambda ps: enc.encode_images([p.read_bytes() for p in ps]), image_paths, batch_size, "images"
        )
        texts = encode_all(enc.encode_texts, captions, batch_size * 4, "captions")
        served = {"image": enc.image.precision, "text": enc.text.precision}
    return images, texts, served


def encode_with_checkpoint(
    checkpoint: Path, image_paths: list[Path], captions: list[str], batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Encodes images and captions with a training checkpoint's PyTorch towers (full forward, eval transform)."""
    try:
        import torch

        from imgtxt.datasets import CaptionedImage
        from trainer.checkpoint import load_checkpoint
        from trainer.data import CaptionTable, PixelSource
        from trainer.encode import encode_split
    except ModuleNotFoundError as exc:
        raise SystemExit(
            f"imgtxt eval --checkpoint needs the [train] extra: pip install 'imgtxt[train]' ({exc})"
        ) from exc

    model = load_checkpoint(checkpoint).model
    # One pseudo-record per image; captions are encoded in the given order, independent of their owners.
    records = [CaptionedImage(i, str(p), p, ("-",), "eval") for i, p in enumerate(image_paths)]
    table = CaptionTable(records, list(captions), np.zeros(len(captions), np.int64))
    source = PixelSource(model, table, image_split=0, text_split=1)
    return encode_split(model, source, table, 0, 1, batch_size, torch.device("cpu"))
