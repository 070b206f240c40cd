"""Encoding a split for offline evaluation with a checkpoint (torch); a bundle is encoded by `imgtxt.encoders.bulk`.

Both return L2-normalised (n_images, D) and (n_texts, D) embeddings; the metrics come from `imgtxt.retrieval_metrics`
either way, and through the index (`evaluation.via_index`) as well.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


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
