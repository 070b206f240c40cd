"""Sample inputs of the service benchmarks: Flickr8k val when present, synthetic images and captions otherwise."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from imgtxt.datasets import default_data_root, load_captioned_images


def sample_items(modality: str, count: int) -> tuple[list[bytes] | list[str], str]:
    """`count` images (file bytes) or captions from Flickr8k val, or synthetic ones when the data is absent."""
    root = default_data_root()
    if (root / "dataset_flickr8k.json").is_file():
        records = load_captioned_images(root, split="val", limit=count)
        if modality == "image":
            return [r.path.read_bytes() for r in records], f"Flickr8k val ({len(records)} JPEGs)"
        return [r.captions[0] for r in records], f"Flickr8k val ({len(records)} first captions)"
    rng = np.random.default_rng(0)
    if modality == "image":
        out = []
        for _ in range(count):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
            out.append(buf.getvalue())
        return out, f"{count} synthetic 224x224 JPEGs"
    words = ["a", "dog", "runs", "on", "the", "beach", "with", "two", "children", "in", "red", "jackets"]
    return [" ".join(rng.choice(words, 12)) for _ in range(count)], f"{count} synthetic 12-word captions"
