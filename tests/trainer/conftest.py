"""Trainer test fixtures: a small synthetic captioned-image collection (JSONL manifest + JPEG files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def write_synthetic_dataset(root: Path, n_train: int = 16, n_val: int = 8, seed: int = 0) -> Path:
    """Coloured-square images with two captions each, in a JSONL manifest (`split` per record); returns the file."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    lines = []
    for i in range(n_train + n_val):
        colour = names[i % len(names)]
        size = ("small", "large")[(i // len(names)) % 2]
        arr = np.full((40, 48, 3), 245, np.uint8)
        side = 12 if size == "small" else 30
        top, left = int(rng.integers(0, 40 - side)), int(rng.integers(0, 48 - side))
        arr[top : top + side, left : left + side] = COLOURS[colour]
        Image.fromarray(arr).save(root / "img" / f"{i:03d}.jpg", quality=92)
        captions = [f"a {size} {colour} square", f"a {colour} block on a white background"]
        split = "train" if i < n_train else "val"
        lines.append(
            json.dumps({"id": f"img{i:03d}", "image": f"img/{i:03d}.jpg", "captions": captions, "split": split})
        )
    manifest = root / "data.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic dataset's JSONL manifest (16 train + 8 val images, 2 captions each)."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"))
