"""The indexing plan of one batch: which images and texts to encode, and which record each embedding row belongs to.

The read stage builds a `BatchPlan`, the encode stage encodes its `job`, the write stage (`writer.build_points`)
looks every embedding row up in the plan instead of counting rows in the order the job was built.
"""

from __future__ import annotations

from dataclasses import dataclass

from imgtxt.encoders.types import EncodeJob
from indexer.reader import LoadedRecord
from store.ids import KINDS


def needs(kinds: tuple[str, ...]) -> tuple[bool, bool]:
    """Whether points of `kinds` need image embeddings and text embeddings (units need both)."""
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
    return "image" in kinds or "unit" in kinds, "text" in kinds or "unit" in kinds


@dataclass(frozen=True)
class TextRow:
    """Where one text embedding row comes from."""

    record: int
    """Position of its record in the batch."""
    caption: int
    """Index of the caption within its record."""


@dataclass(frozen=True)
class BatchPlan:
    """One batch of loaded records and the map from each embedding row of its encode job back to them."""

    records: list[LoadedRecord]
    """The batch's records, in shard order."""
    kinds: tuple[str, ...]
    """Kinds of points to make."""
    image_rows: list[int]
    """Per image embedding row: the position of its record (only records whose image bytes were read)."""
    text_rows: list[TextRow]
    """Per text embedding row: its record and caption."""
    end: int
    """Position (in the shard's order) just after the batch's last record: the checkpoint value once written."""

    @classmethod
    def build(cls, records: list[LoadedRecord], kinds: tuple[str, ...], end: int) -> BatchPlan:
        """Plans a batch: every readable image when images are needed, every caption when texts are."""
        need_images, need_texts = needs(kinds)
        image_rows = [i for i, r in enumerate(records) if need_images and r.image_bytes is not None]
        text_rows = [TextRow(i, j) for i, r in enumerate(records) for j in range(len(r.record.texts))]
        return cls(records, kinds, image_rows, text_rows if need_texts else [], end)

    @property
    def job(self) -> EncodeJob:
        """The images and texts to encode, row for row as `image_rows` and `text_rows` say."""
        images = [self.records[i].image_bytes for i in self.image_rows]
        texts = [self.records[t.record].record.texts[t.caption] for t in self.text_rows]
        return EncodeJob([b for b in images if b is not None], texts)
