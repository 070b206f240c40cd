"""The vector-store contract shared by the embedded Qdrant engine and the qdrant-client path: configs, points, hits."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

QUANTIZATIONS = ("none", "int8", "binary")
VECTOR_NAMES = ("image", "text", "unit")


class DimensionMismatch(ValueError):
    """A collection exists with a different vector dimension than the bundle's."""


@dataclass(frozen=True)
class CollectionConfig:
    """How a collection is created (HNSW graph, storage placement, quantisation)."""

    dim: int
    """Vector dimension (the bundle's embedding_dim)."""
    hnsw_m: int = 16
    """HNSW edges per node."""
    hnsw_ef_construct: int = 100
    """HNSW candidates while building the graph."""
    full_scan_threshold: int = 10_000
    """Below this many KB of vectors a segment is scanned instead of using the graph."""
    indexing_threshold: int | None = None
    """KB of vectors in a segment before its HNSW graph is built (None = Qdrant's default, 10 MB)."""
    on_disk: bool = False
    """Keep original vectors on disk (mmap) instead of in RAM."""
    quantization: str = "none"
    """`none`, `int8` (scalar) or `binary`; searches rescore with the original vectors."""

    def __post_init__(self) -> None:
        if self.dim <= 0:
            raise ValueError(f"dim must be positive, got {self.dim}")
        if self.hnsw_m < 2 or self.hnsw_ef_construct < 4:
            raise ValueError(
                f"hnsw_m must be >= 2 and hnsw_ef_construct >= 4, got {self.hnsw_m}, {self.hnsw_ef_construct}"
            )
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")


@dataclass(frozen=True)
class SearchOptions:
    """Per-query search parameters."""

    hnsw_ef: int | None = None
    """HNSW candidates while searching (None = the engine's default)."""
    exact: bool = False
    """Brute-force search (exact neighbours; the reference for recall)."""
    rescore: bool = True
    """With quantisation: re-rank candidates with the original vectors."""
    oversampling: float | None = None
    """With quantisation: fetch this many times `limit` candidates before rescoring."""

    def __post_init__(self) -> None:
        if self.hnsw_ef is not None and self.hnsw_ef <= 0:
            raise ValueError(f"hnsw_ef must be positive, got {self.hnsw_ef}")
        if self.oversampling is not None and self.oversampling < 1:
            raise ValueError(f"oversampling must be >= 1, got {self.oversampling}")


DEFAULT_SEARCH = SearchOptions()


@dataclass(frozen=True)
class PointData:
    """One point to write: deterministic id, named vectors and payload."""

    id: str
    """uuid5 string (see `indexer.ids.point_id`)."""
    vectors: dict[str, np.ndarray]
    """Named (D,) float32 vectors: any of `image`, `text`, `unit`."""
    payload: dict[str, Any] = field(default_factory=dict)
    """JSON payload."""


@dataclass(frozen=True)
class Hit:
    """One search result."""

    id: str
    """Point id."""
    score: float
    """Cosine similarity."""
    payload: dict[str, Any]
    """The point's payload."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"id": self.id, "score": self.score, "payload": self.payload}


class VectorStore(Protocol):
    """What the indexer and search need from a vector store; `EdgeStore` and `ClientStore` implement it."""

    def ensure_collection(self, name: str, config: CollectionConfig) -> None:
        """Creates the collection, or checks that an existing one has the same dimension (DimensionMismatch)."""
        ...

    def delete_collection(self, name: str) -> None:
        """Deletes a collection and its points (nothing when absent)."""
        ...

    def open_collection(self, name: str) -> int:
        """Opens an existing collection for reading and returns its dimension (KeyError when absent)."""
        ...

    def upsert(self, points: list[PointData]) -> None:
        """Writes points (overwriting same ids); returns once the store has applied them."""
        ...

    def flush(self) -> None:
        """Makes every applied write durable; a checkpoint is written only after this returns."""
        ...

    def optimize(self) -> None:
        """Builds search indexes (HNSW) over what was written."""
        ...

    def search(
        self,
        vectors: np.ndarray,
        using: str,
        limit: int,
        filters: dict[str, Any] | None = None,
        options: SearchOptions = DEFAULT_SEARCH,
        with_payload: bool = True,
    ) -> list[list[Hit]]:
        """Nearest neighbours of each row of `vectors` (Q, D) by the named vector `using`, best first."""
        ...

    def count(self, filters: dict[str, Any] | None = None) -> int:
        """Number of points (matching the payload filters)."""
        ...

    def dump(self) -> dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]]:
        """Every point as id -> (payload, named vectors): for tests and small collections only."""
        ...

    def close(self) -> None:
        """Releases the store."""
        ...


def read_metadata(path: Path) -> dict[str, Any]:
    """Reads a small JSON metadata file, `{}` when absent."""
    return json.loads(path.read_text()) if path.is_file() else {}
