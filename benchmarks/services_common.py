"""Helpers of the service benchmarks: sample inputs (Flickr8k val when present) and a service run as a subprocess."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from imgtxt.datasets import default_data_root, load_captioned_images

ROOT = Path(__file__).resolve().parent.parent
SERVICE_MODULES = {"image": "image_encoder_service", "text": "text_encoder_service"}


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


@contextmanager
def running_service(modality: str, bundle: Path, *flags: str) -> Iterator[int]:
    """Starts `python -m <modality>_encoder_service` on 127.0.0.1 and a free port; yields the port; SIGTERM on exit."""
    cmd = [sys.executable, "-m", SERVICE_MODULES[modality], "--bundle", str(bundle), "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*cmd, "--port", "0", "--device", "cpu", *flags], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening on port "):
            raise RuntimeError(f"service failed to start (exit code {proc.wait()})")
        yield int(line.split()[-1])
    finally:
        proc.terminate()
        proc.wait(60)
