"""What encoding promises, shared by the in-process encoders and the gRPC clients (no ONNX Runtime, no gRPC).

Per-item outcomes, batch results, what an encoder serves (`EncoderInfo`), and the `Encoder` protocol: both towers of
one bundle, whether they run here (`imgtxt.encoders.BundleEncoder`) or behind the services
(`imgtxt.client.ServiceEncoder`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

import numpy as np

from imgtxt.bundle import BundleIdentity
from imgtxt.errors import InvalidInput, LimitExceeded


class ItemCode(IntEnum):
    """Per-item status; the numbers are the gRPC status codes the wire contract uses (`ItemResult.code`)."""

    OK = 0
    INVALID_ARGUMENT = 3
    RESOURCE_EXHAUSTED = 8
    INTERNAL = 13


@dataclass(frozen=True)
class ItemOutcome:
    """The outcome of one item of a batch."""

    code: ItemCode = ItemCode.OK
    """OK, or why this item has no embedding."""
    message: str = ""
    """Reason when code is not OK, naming the item and the limit."""
    truncated: bool = False
    """Text only: the text was cut at the bundle's token limit (it is still encoded)."""
    num_tokens: int = 0
    """Text only: tokens encoded, special tokens included."""

    @property
    def ok(self) -> bool:
        """Whether the item has an embedding."""
        return self.code == ItemCode.OK

    @classmethod
    def from_error(cls, index: int, exc: Exception) -> ItemOutcome:
        """The outcome of an item whose preparation raised `exc`, naming the item by its batch position."""
        if isinstance(exc, LimitExceeded):
            code = ItemCode.RESOURCE_EXHAUSTED
        elif isinstance(exc, InvalidInput):
            code = ItemCode.INVALID_ARGUMENT
        else:
            code = ItemCode.INTERNAL
        return cls(code=code, message=f"item {index}: {exc}")


@dataclass(frozen=True)
class EncodeResult:
    """Embeddings of a batch, in item order; rows of failed items are zeros."""

    embeddings: np.ndarray
    """(N, D) float32, one row per item."""
    outcomes: list[ItemOutcome]
    """One outcome per item, in order."""

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != len(self.outcomes):
            raise ValueError(f"embeddings shape {self.embeddings.shape} does not match {len(self.outcomes)} outcomes")

    def __len__(self) -> int:
        return len(self.outcomes)

    @property
    def ok(self) -> np.ndarray:
        """(N,) bool mask of the items that have an embedding."""
        return np.fromiter((o.ok for o in self.outcomes), dtype=bool, count=len(self.outcomes))

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return int(self.embeddings.shape[1])

    @classmethod
    def concat(cls, parts: Sequence[EncodeResult], dim: int) -> EncodeResult:
        """Joins the results of consecutive chunks into one."""
        if not parts:
            return cls(np.zeros((0, dim), np.float32), [])
        return cls(np.concatenate([p.embeddings for p in parts]), [o for p in parts for o in p.outcomes])


@dataclass(frozen=True)
class EncoderInfo:
    """What an encoder serves and how (the `Info` rpc reports it)."""

    modality: str
    """`image` or `text`."""
    bundle_version: str
    """Version of the loaded bundle."""
    bundle_sha256: str
    """Digest of the bundle's files."""
    dim: int
    """Embedding dimension."""
    normalized: bool
    """Whether outputs are L2-normalised."""
    distance: str
    """Distance the space was trained for."""
    execution_provider: str
    """Provider the session actually runs on."""
    providers: list[str]
    """The session's provider list, in priority order."""
    limits: dict[str, int] = field(default_factory=dict)
    """Per-item limits of this modality (image bytes/pixels, text tokens/characters)."""
    precision: str = "fp32"
    """Precision of the served graph (`fp32`, `fp16`, `int8`)."""
    precision_reason: str = ""
    """Why that precision: the flag, or what `--precision auto` read in the bundle."""


@dataclass(frozen=True)
class EncodeJob:
    """One batch's work for both towers."""

    images: list[bytes]
    """Encoded image bytes, in order."""
    texts: list[str]
    """Texts, in order."""


class Encoder(Protocol):
    """Both towers of one bundle: what indexing, search and evaluation need from an encoder."""

    dim: int
    """Embedding dimension."""
    bundle_version: str
    """Version of the bundle whose towers encode."""
    identity: BundleIdentity
    """The bundle's identity (version, digest, dimension, trained quantisation, unit head): what a collection
    records and every reader and writer of one checks."""

    def encode_images(self, images: Sequence[bytes]) -> EncodeResult:
        """Embeddings of a batch of images, with one outcome per item (bad items fail alone)."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> EncodeResult:
        """Embeddings of a batch of texts, with one outcome per item."""
        ...

    def encode_jobs(self, jobs: Iterable[EncodeJob]) -> Iterator[tuple[EncodeResult, EncodeResult]]:
        """(images, texts) results of each job, in order; jobs are drawn lazily, so long inputs stream."""
        ...

    def limits(self) -> dict[str, int]:
        """Per-item limits of the towers it reaches (`max_image_bytes`, `max_image_pixels`, `max_tokens`,
        `max_text_chars`), named as in the wire contract's `Limits` message."""
        ...

    def close(self) -> None:
        """Releases sessions or channels."""
        ...
