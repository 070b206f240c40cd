"""Captioned-image collections: Karpathy-style `dataset_*.json` files and JSONL manifests, read one way everywhere."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from imgtxt.errors import InvalidInput

SPLITS = ("train", "val", "test", "restval")
DEFAULT_DATA_ROOT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "flickr8k"


@dataclass(frozen=True)
class CaptionedImage:
    """One image and its captions (several positives for one image)."""

    image_id: int
    """Dense index of the image within the loaded split (0..N-1); captions of one image share it."""
    key: str
    """Stable source key (the file name, or the manifest's id) used for deterministic ids downstream."""
    path: Path
    """Absolute path of the image file."""
    captions: tuple[str, ...]
    """Human captions of the image."""
    split: str
    """Split the record belongs to."""


def default_data_root() -> Path:
    """`$IMGTXT_DATA` if set, else `../shared/data/flickr8k` beside the repository."""
    return Path(os.environ.get("IMGTXT_DATA", DEFAULT_DATA_ROOT))


def _dataset_file(path: Path) -> Path:
    if path.is_dir():
        candidates = sorted(path.glob("dataset_*.json")) + sorted(path.glob("*.jsonl"))
        if not candidates:
            raise InvalidInput(f"{path} holds no dataset_*.json or *.jsonl file")
        return candidates[0]
    return path


def load_captioned_images(path: str | Path, split: str | None = None, limit: int | None = None) -> list[CaptionedImage]:
    """Reads a Karpathy-style `dataset_*.json` or a JSONL manifest (`{"image": path, "captions": [...]}` per line).

    Args:
        path: The dataset file, or a directory holding one (e.g. `../shared/data/flickr8k`). Karpathy images live in
            `images/` beside the file (or the record's `filepath`); JSONL image paths are relative to the file.
        split: Keep only this split (`train`, `val`, ...); JSONL records without `split` count as `train`.
        limit: Keep at most this many images (after the split filter), for quick runs and tests.

    Raises:
        InvalidInput: Unreadable file, unknown split, or a record without image or captions (naming its line/index).
    """
    if split is not None and split not in SPLITS:
        raise InvalidInput(f"split must be one of {SPLITS}, got {split!r}")
    file = _dataset_file(Path(path))
    if not file.is_file():
        raise InvalidInput(f"dataset file {file} not found")
    root = file.parent
    raw: list[dict] = []
    if file.suffix == ".jsonl":
        for n, line in enumerate(file.read_text().splitlines(), 1):
            if line.strip():
                try:
                    raw.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InvalidInput(f"{file}:{n}: not valid JSON ({exc})") from exc
        records = [
            (
                str(r.get("id", r.get("image"))),
                root / str(r.get("image", "")),
                r.get("captions"),
                r.get("split", "train"),
            )
            for r in raw
        ]
    else:
        data = json.loads(file.read_text())
        if "images" not in data:
            raise InvalidInput(f"{file} has no 'images' list (not a Karpathy-style dataset file)")
        records = [
            (
                r.get("filename", ""),
                root / r.get("filepath", "images") / r.get("filename", ""),
                [s["raw"] if isinstance(s, dict) else s for s in r.get("sentences", [])],
                r.get("split", "train"),
            )
            for r in data["images"]
        ]
    out: list[CaptionedImage] = []
    for n, (key, img_path, captions, rec_split) in enumerate(records):
        if split is not None and rec_split != split:
            continue
        if not key or not captions or not all(isinstance(c, str) and c.strip() for c in captions):
            raise InvalidInput(f"{file}: record {n} needs an image and a non-empty list of non-empty captions")
        out.append(CaptionedImage(len(out), key, img_path.resolve(), tuple(c.strip() for c in captions), rec_split))
        if limit is not None and len(out) >= limit:
            break
    return out
