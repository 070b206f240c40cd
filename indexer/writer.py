"""The write stage's logic: encoded batches -> points with deterministic ids and payloads, plus rejects."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from imgtxt.encoders.types import EncodeResult, ItemCode
from imgtxt.encoders.unit import UnitEncoder
from indexer.plan import BatchPlan, needs
from store.base import PointData
from store.ids import point_id


@dataclass(frozen=True)
class Reject:
    """An item that could not become a point."""

    key: str
    """Source key of the item."""
    kind: str
    """`image`, `text` or `unit`, or `record` for a source entry that is not a record (a malformed manifest line)."""
    reason: str
    """Why (malformed line, unreadable file, undecodable image, empty text, encoder failure...)."""
    failed: bool = False
    """An encoder failure (INTERNAL) rather than bad input; counted as `failed`, not `skipped`."""
    line: int | None = None
    """Line of the JSONL manifest the item comes from."""


class RejectsFile:
    """Appends rejects as JSONL (`{"key", "kind", "reason"}`, plus `line` for manifest items); truncatable to a
    checkpointed size on resume. A file left empty is removed on close, so the file exists only when it lists
    something.

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
            entry: dict[str, Any] = {"key": r.key, "kind": r.kind, "reason": r.reason}
            if r.line is not None:
                entry["line"] = r.line
            f.write(json.dumps(entry) + "\n")

    def commit(self) -> int:
        """Makes written rejects durable and returns the file size (to record in the checkpoint)."""
        if self._f is None:
            return 0
        self._f.flush()
        os.fsync(self._f.fileno())
        return self._f.tell()

    def close(self) -> None:
        """Closes the file, removing it when it lists nothing (e.g. truncated back to empty on a restart)."""
        if self._f is not None:
            empty = self._f.tell() == 0
            self._f.close()
            self._f = None
            if empty and self.path is not None:
                self.path.unlink(missing_ok=True)


def _reason(result: EncodeResult, index: int) -> tuple[str, bool]:
    outcome = result.outcomes[index]
    return outcome.message or outcome.code.name, outcome.code == ItemCode.INTERNAL


def build_points(
    plan: BatchPlan,
    images: EncodeResult,
    texts: EncodeResult,
    fusion: UnitEncoder,
    extra_payload: dict[str, Any],
) -> tuple[list[PointData], list[Reject]]:
    """Turns one batch's encodings into points (image, text and unit) and rejects.

    Each embedding row is found through the plan (`plan.image_rows`, `plan.text_rows`), the same map the encode job
    was built from.

    Args:
        plan: The batch's records and the map from embedding rows to them.
        images: Encodings of `plan.job.images`.
        texts: Encodings of `plan.job.texts`.
        fusion: Makes unit vectors.
        extra_payload: Added to every point's payload (e.g. the bundle version).

    Raises:
        ValueError: The encodings do not have one row per planned row.
    """
    if len(images) != len(plan.image_rows) or len(texts) != len(plan.text_rows):
        raise ValueError(
            f"encodings do not match the plan: {len(images)} image rows for {len(plan.image_rows)} planned, "
            f"{len(texts)} text rows for {len(plan.text_rows)} planned"
        )
    kinds = plan.kinds
    need_images, need_texts = needs(kinds)
    image_row = {record: row for row, record in enumerate(plan.image_rows)}
    text_row = {(t.record, t.caption): row for row, t in enumerate(plan.text_rows)}
    points: list[PointData] = []
    rejects: list[Reject] = []
    unit_rows: list[tuple[str, dict[str, Any], np.ndarray, np.ndarray]] = []
    for r, loaded in enumerate(plan.records):
        rec = loaded.record
        if rec.error is not None:
            rejects.append(Reject(rec.key, "record", rec.error, line=rec.line))
            continue
        base = {**rec.payload, **extra_payload}
        image_vec: np.ndarray | None = None
        image_reason, image_failed = "", False
        if need_images and rec.image is not None:
            if r not in image_row:
                image_reason = loaded.image_error or "unreadable image"
            elif images.outcomes[image_row[r]].ok:
                image_vec = images.embeddings[image_row[r]]
            else:
                image_reason, image_failed = _reason(images, image_row[r])
            if "image" in kinds:
                if image_vec is not None:
                    payload = {**base, "kind": "image", "key": rec.key, "image_path": str(rec.image)}
                    points.append(PointData(point_id("image", rec.key), {"image": image_vec}, payload))
                else:
                    rejects.append(Reject(rec.key, "image", image_reason, image_failed, rec.line))
        if not need_texts:
            continue
        # A caption belongs to its image: when the job reads the image and it is missing or undecodable, the
        # caption is rejected with it, so no text point names an image that has no point.
        image_rejected = need_images and rec.image is not None and image_vec is None
        for i, text in enumerate(rec.texts):
            key = rec.text_key(i)
            row = text_row[(r, i)]
            ok = texts.outcomes[row].ok
            text_vec = texts.embeddings[row] if ok else None
            text_reason, text_failed = ("", False) if ok else _reason(texts, row)
            payload = {**base, "key": key, "text": text, "caption_index": i}
            if rec.image is not None and "image" in kinds:
                payload["image_key"] = rec.key
            if "text" in kinds:
                if image_rejected:
                    rejects.append(
                        Reject(key, "text", f"its image was rejected: {image_reason}", image_failed, rec.line)
                    )
                elif text_vec is not None:
                    points.append(PointData(point_id("text", key), {"text": text_vec}, {**payload, "kind": "text"}))
                else:
                    rejects.append(Reject(key, "text", text_reason, text_failed, rec.line))
            if "unit" in kinds and rec.image is not None:
                if image_vec is not None and text_vec is not None:
                    unit_payload = {**payload, "kind": "unit", "image_path": str(rec.image), "fusion": fusion.kind}
                    unit_rows.append((key, unit_payload, image_vec, text_vec))
                else:
                    reason = image_reason if image_vec is None else text_reason
                    failed = image_failed if image_vec is None else text_failed
                    rejects.append(Reject(key, "unit", reason, failed, rec.line))
    if unit_rows:
        fused = fusion.fuse(np.stack([u[2] for u in unit_rows]), np.stack([u[3] for u in unit_rows]))
        for (key, payload, v, t), u in zip(unit_rows, fused, strict=True):
            points.append(PointData(point_id("unit", key), {"image": v, "text": t, "unit": u}, payload))
    return points, rejects
