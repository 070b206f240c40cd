"""Test support: tiny random-weight towers and their bundle, exported through the same path as real towers."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.export import export_model
from trainer.model import DualEncoder, ModelSpec


def tiny_model(dim: int = 32, seed: int = 0, with_unit: bool = True, image_size: int = 32) -> DualEncoder:
    """Tiny random-weight towers (conv image tower, one-layer text tower) over the MiniLM tokenizer vocabulary."""
    torch.manual_seed(seed)
    spec = ModelSpec(
        image_backbone="tiny", text_backbone="tiny", dim=dim, image_size=image_size, max_tokens=32, with_unit=with_unit
    )
    return DualEncoder(spec).eval()


def export_tiny_bundle(out_dir: Path, dim: int = 32, seed: int = 0, with_unit: bool = True) -> Path:
    """Builds tiny random-weight towers and exports them through the same path as real towers (for tests and demos).

    Returns:
        The bundle directory.
    """
    model = tiny_model(dim, seed, with_unit)
    bundle = export_model(model, Path(out_dir), version=f"tiny-d{dim}-s{seed}")
    return bundle.path
