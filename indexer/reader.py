"""The read stage: a dataset file, a JSONL manifest or a folder of images -> source records, in a stable order."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgtxt.datasets import load_captioned_images
from imgtxt.errors import InvalidInput

logger = logging.getLogger(__name__)


def shard_of(key: str, num_shards: int) -> int:
    """The shard (0..num_shards-1) a source key belongs to: a stable hash, identical on every machine and run.

    Python's `hash()` is salted per process, so a cryptographic digest is used instead.
    """
    if num_shards <= 0:
        raise ValueError(f"num_shards must be positive, got {num_shards}")
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") % num_shards


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif")
SOURCE_KINDS = ("auto", "dataset", "manifest", "folder")


@dataclass(frozen=True)
class SourceRecord:
    """One input item: an image, its captions, or both (which also makes image+caption units)."""

    key: str
    """Stable source key; point ids and shard assignment derive from it."""
    image: Path | None = None
    """Image file, if the record has one."""
    texts: tuple[str, ...] = ()
    """Captions / texts of the record."""
    payload: dict[str, Any] = field(default_factory=dict)
    """Extra payload stored on every point made from the record."""
    line: int | None = None
    """Line of the JSONL manifest the record comes from (named in its rejects)."""
    error: str | None = None
    """Why the source entry is unusable (e.g. a malformed manifest line): it becomes one reject, not an abort."""

    def text_key(self, index: int) -> str:
        """Source key of the record's `index`-th text (and of its unit with the image)."""
        return f"{self.key}#{index}"


@dataclass(frozen=True)
class LoadedRecord:
    """A source record with its image bytes read (or the reason they could not be)."""

    record: SourceRecord
    """The source record."""
    image_bytes: bytes | None = None
    """Encoded image bytes, when the record has a readable image."""
    image_error: str | None = None
    """Why the image could not be read (the record's image and units are then rejected)."""


def detect_kind(path: Path) -> str:
    """`folder` for a directory of images, `manifest` for `*.jsonl`, else `dataset` (Karpathy-style JSON)."""
    if path.is_dir():
        return "dataset" if sorted(path.glob("dataset_*.json")) else "folder"
    return "manifest" if path.suffix == ".jsonl" else "dataset"


def _read_dataset(path: Path, split: str | None) -> Iterator[SourceRecord]:
    for item in load_captioned_images(path, split=split):
        yield SourceRecord(item.key, item.path, item.captions, {"split": item.split})


def _manifest_record(root: Path, raw: Any) -> SourceRecord:
    """One parsed manifest line as a record (its line and key are set by the caller).

    Raises:
        ValueError: The line is not a valid record, saying which field is wrong.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"each line must be a JSON object, got {type(raw).__name__}")
    captions = raw.get("captions")
    if captions is not None and not isinstance(captions, list):
        raise ValueError("'captions' must be a list of strings")
    texts = captions or ([raw["text"]] if raw.get("text") is not None else [])
    image = raw.get("image")
    if not image and not texts:
        raise ValueError("a record needs an 'image', a 'text' or 'captions'")
    if image is not None and not isinstance(image, str):
        raise ValueError("'image' must be a path string")
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("'text' and 'captions' must be strings")
    payload = raw.get("payload") or {}
    if not isinstance(payload, dict):
        raise ValueError("'payload' must be a JSON object")
    key = raw.get("id")
    if key is not None and not isinstance(key, str | int):
        raise ValueError("'id' must be a string or an integer")
    if key is None:
        key = image if image else "text:" + hashlib.sha1("\n".join(texts).encode()).hexdigest()[:20]
    return SourceRecord(str(key), (root / image).resolve() if image else None, tuple(texts), payload)


def _read_manifest(path: Path) -> Iterator[SourceRecord]:
    """Records of a JSONL manifest; a malformed line becomes a record with `error` (keyed `<file>:<line>`), so it
    is listed as one reject while the rest of the job goes on."""
    root = path.parent
    with open(path, "rb") as f:
        for n, raw_line in enumerate(f, 1):
            if not raw_line.strip():
                continue
            try:
                rec = _manifest_record(root, json.loads(raw_line.decode("utf-8")))
            except UnicodeDecodeError as exc:
                yield SourceRecord(f"{path.name}:{n}", line=n, error=f"line {n}: not valid UTF-8 ({exc.reason})")
            except json.JSONDecodeError as exc:
                yield SourceRecord(f"{path.name}:{n}", line=n, error=f"line {n}: not valid JSON ({exc})")
            except ValueError as exc:
                yield SourceRecord(f"{path.name}:{n}", line=n, error=f"line {n}: {exc}")
            else:
                yield dataclasses.replace(rec, line=n)


def _read_folder(path: Path) -> Iterator[SourceRecord]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    for p in files:
        yield SourceRecord(p.relative_to(path).as_posix(), p.resolve())


def read_records(
    path: str | Path,
    kind: str = "auto",
    split: str | None = None,
    limit: int | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
) -> Iterator[SourceRecord]:
    """Yields the records of one shard of a source, in a deterministic order.

    Args:
        path: Dataset file or directory, JSONL manifest, or folder of images.
        kind: `auto`, `dataset`, `manifest` or `folder`.
        split: Dataset split to keep (dataset sources only; None keeps every split).
        limit: Keep at most this many records of the whole source (before sharding, so shards of a limited run
            still partition the same records).
        shard_index: Which shard to yield.
        num_shards: Number of shards; a record belongs to shard `hash(key) % num_shards`.

    Raises:
        InvalidInput: Unknown kind, missing source, a split for a source without splits, or a malformed dataset
            file (a malformed manifest line is a record with `error` instead).
    """
    if kind not in SOURCE_KINDS:
        raise InvalidInput(f"source kind must be one of {SOURCE_KINDS}, got {kind!r}")
    if not 0 <= shard_index < num_shards:
        raise InvalidInput(f"shard index must be in [0, {num_shards}), got {shard_index}")
    src = Path(path)
    if not src.exists():
        raise InvalidInput(f"source {src} does not exist")
    kind = detect_kind(src) if kind == "auto" else kind
    if split is not None and kind != "dataset":
        raise InvalidInput(f"--split {split} applies to dataset sources only, and {src} is a {kind}")
    if kind == "dataset":
        records = _read_dataset(src, split)
    elif kind == "manifest":
        records = _read_manifest(src)
    else:
        records = _read_folder(src)
    for n, rec in enumerate(records):
        if limit is not None and n >= limit:
            break
        if num_shards == 1 or shard_of(rec.key, num_shards) == shard_index:
            yield rec


def load_record(record: SourceRecord, max_bytes: int = 20 * 1024 * 1024) -> LoadedRecord:
    """Reads a record's image bytes; an unreadable or oversized file becomes an error, never an exception."""
    if record.image is None:
        return LoadedRecord(record)
    try:
        size = record.image.stat().st_size
        if size > max_bytes:
            return LoadedRecord(record, image_error=f"image file is {size} bytes, over the {max_bytes} limit")
        return LoadedRecord(record, image_bytes=record.image.read_bytes())
    except OSError as exc:
        return LoadedRecord(record, image_error=f"cannot read image: {exc.strerror or exc}")


def source_fingerprint(path: str | Path) -> str:
    """Identifies a source's contents cheaply (path, size, mtime), so a checkpoint is not resumed on other input."""
    p = Path(path).resolve()
    st = p.stat()
    if p.is_dir():
        target = next(iter(sorted(p.glob("dataset_*.json"))), None)
        st = target.stat() if target else st
    return hashlib.sha1(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
