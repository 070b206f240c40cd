"""The write stage's logic: encoded batches -> points with deterministic ids and payloads, plus rejects."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from imgtxt.serving.result import EncodeResult, ItemCode
from indexer.encoding import UnitFusion
from indexer.ids import point_id
from indexer.reader import LoadedRecord
from indexer.store import PointData


@dataclass(frozen=True)
class Reject:
    """An item that could not become a point."""

    key: str
    """Source key of the item."""
    kind: str
    """`image`, `text` or `unit`."""
    reason: str
    """Why (unreadable file, undecodable image, empty text, encoder failure...)."""
    failed: bool = False
    """An encoder failure (INTERNAL) rather than bad input; counted as `failed`, not `skipped`."""


class RejectsFile:
    """Appends rejects as JSONL (`{"key", "kind", "reason"}`); truncatable to a checkpointed size on resume.

    Args:
        path: The file (its directory is created), or None to keep no file.
        truncate_to: Size to cut the existing file to (0 starts empty).
    """

    def __init__(self, path: Path | None, truncate_to: int = 0) -> None:
        self.path = path
        self._f: TextIO | None = None
        # Opened only when there is something to keep: a job without rejects leaves no empty file behind.
        if path is not None and path.exists():
            self._open(truncate_to)

    def _open(self, truncate_to: int = 0) -> TextIO:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - lives as long as the job
        self._f.truncate(truncate_to)
        self._f.seek(truncate_to)
        return self._f

    def write(self, rejects: list[Reject]) -> None:
        """Appends rejects."""
        if self.path is None or not rejects:
            return
        f = self._f or self._open()
        for r in rejects:
            f.write(json.dumps({"key": r.key, "kind": r.kind, "reason": r.reason}) + "\n")

    def commit(self) -> int:
        """Makes written rejects durable and returns the file size (to record in the checkpoint)."""
        if self._f is None:
            return 0
        self._f.flush()
        os.fsync(self._f.fileno())
        return self._f.tell()

    def close(self) -> None:
        """Closes the file."""
        if self._f is not None:
            self._f.close()


def _reason(result: EncodeResult, index: int) -> tuple[str, bool]:
    outcome = result.outcomes[index]
    return outcome.message or outcome.code.name, outcome.code == ItemCode.INTERNAL


def build_points(
    records: list[LoadedRecord],
    images: EncodeResult,
    texts: EncodeResult,
    kinds: tuple[str, ...],
    fusion: UnitFusion,
    extra_payload: dict[str, Any],
) -> tuple[list[PointData], list[Reject]]:
    """Turns one batch's encodings into points (image, text and unit) and rejects.

    `images` holds one row per record with a readable image (when images were encoded), `texts` one row per text
    of every record (when texts were encoded), in record order, as the read stage built the encode job.

    Args:
        records: The batch's records, in order.
        images: Image encodings.
        texts: Text encodings.
        kinds: Which kinds of points to make.
        fusion: Makes unit vectors.
        extra_payload: Added to every point's payload (e.g. the bundle version).
    """
    need_images = "image" in kinds or "unit" in kinds
    need_texts = "text" in kinds or "unit" in kinds
    points: list[PointData] = []
    rejects: list[Reject] = []
    unit_rows: list[tuple[str, dict[str, Any], np.ndarray, np.ndarray]] = []
    ii = ti = 0
    for loaded in records:
        rec = loaded.record
        base = {**rec.payload, **extra_payload}
        image_vec: np.ndarray | None = None
        image_reason, image_failed = "", False
        if need_images and rec.image is not None:
            if loaded.image_bytes is None:
                image_reason = loaded.image_error or "unreadable image"
            else:
                if images.outcomes[ii].ok:
                    image_vec = images.embeddings[ii]
                else:
                    image_reason, image_failed = _reason(images, ii)
                ii += 1
            if "image" in kinds:
                if image_vec is not None:
                    payload = {**base, "kind": "image", "key": rec.key, "image_path": str(rec.image)}
                    points.append(PointData(point_id("image", rec.key), {"image": image_vec}, payload))
                else:
                    rejects.append(Reject(rec.key, "image", image_reason, image_failed))
        if not need_texts:
            continue
        for i, text in enumerate(rec.texts):
            key = rec.text_key(i)
            ok = texts.outcomes[ti].ok
            text_vec = texts.embeddings[ti] if ok else None
            text_reason, text_failed = ("", False) if ok else _reason(texts, ti)
            ti += 1
            payload = {**base, "key": key, "text": text, "caption_index": i}
            if rec.image is not None:
                payload["image_key"] = rec.key
            if "text" in kinds:
                if text_vec is not None:
                    points.append(PointData(point_id("text", key), {"text": text_vec}, {**payload, "kind": "text"}))
                else:
                    rejects.append(Reject(key, "text", text_reason, text_failed))
            if "unit" in kinds and rec.image is not None:
                if image_vec is not None and text_vec is not None:
                    unit_payload = {**payload, "kind": "unit", "image_path": str(rec.image)}
                    unit_rows.append((key, unit_payload, image_vec, text_vec))
                else:
                    reason = image_reason if image_vec is None else text_reason
                    rejects.append(Reject(key, "unit", reason, image_failed if image_vec is None else text_failed))
    if unit_rows:
        fused = fusion.fuse(np.stack([r[2] for r in unit_rows]), np.stack([r[3] for r in unit_rows]))
        for (key, payload, v, t), u in zip(unit_rows, fused, strict=True):
            points.append(PointData(point_id("unit", key), {"image": v, "text": t, "unit": u}, payload))
    return points, rejects
