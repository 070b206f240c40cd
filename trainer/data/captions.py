"""A split flattened to one row per caption, with the dense image index of every caption."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from imgtxt.datasets import CaptionedImage


@dataclass(frozen=True)
class CaptionTable:
    """A split flattened to one row per caption; captions of one image share its dense image index."""

    images: list[CaptionedImage]
    """The images, indexed 0..N-1."""
    captions: list[str]
    """All captions, image by image."""
    caption_image: np.ndarray
    """(n_captions,) int64 image index of each caption."""

    @classmethod
    def from_images(cls, images: Sequence[CaptionedImage]) -> CaptionTable:
        """Flattens a loaded split (image ids are re-numbered densely in order)."""
        caps: list[str] = []
        owner: list[int] = []
        for i, rec in enumerate(images):
            caps.extend(rec.captions)
            owner.extend([i] * len(rec.captions))
        return cls(list(images), caps, np.asarray(owner, dtype=np.int64))

    def caption_spans(self, image_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(starts, ends): the captions of image `image_idx[k]` are rows `starts[k]:ends[k]` (stored image by image)."""
        starts = np.searchsorted(self.caption_image, image_idx, side="left")
        return starts, np.searchsorted(self.caption_image, image_idx, side="right")

    def captions_of(self, image_idx: np.ndarray) -> np.ndarray:
        """Indices of all captions of the given images (in the order of `image_idx`)."""
        starts, ends = self.caption_spans(image_idx)
        return np.concatenate([np.arange(a, b) for a, b in zip(starts, ends, strict=True)]).astype(np.int64)

    def split_last(self, n_images: int) -> tuple[CaptionTable, CaptionTable]:
        """(the table without its last `n_images` images, a table of those images): a deterministic held-out split
        whose captions are the contiguous tail of this table's, so a feature store of this table slices into both."""
        if not 0 < n_images < len(self.images):
            raise ValueError(f"can hold out 1..{len(self.images) - 1} of {len(self.images)} images, not {n_images}")
        keep = len(self.images) - n_images
        return CaptionTable.from_images(self.images[:keep]), CaptionTable.from_images(self.images[keep:])

    def fingerprint(self) -> str:
        """Identity of the split's content (image keys, sizes, mtimes, captions) for cache keys."""
        h = hashlib.sha256()
        for rec in self.images:
            st = rec.path.stat()
            h.update(f"{rec.key}|{rec.path}|{st.st_size}|{int(st.st_mtime)}\n".encode())
        h.update("\n".join(self.captions).encode())
        return h.hexdigest()
