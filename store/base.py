"""The vector-store contract shared by the embedded Qdrant engine and the qdrant-client path: configs, points, hits."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from imgtxt.bundle import QUANTIZATIONS, BundleIdentity

VECTOR_NAMES = ("image", "text", "unit")
# KB of vectors per segment of the embedded engine: 100k vectors at dim 512 (see `CollectionConfig.max_segment_size`).
DEFAULT_MAX_SEGMENT_SIZE = 200_000
# Where an option applies.
BOTH, SERVER, EMBEDDED = "both", "server", "embedded"


@dataclass(frozen=True)
class CollectionOption:
    """One collection option, declared once: the argparse flag, its environment variable, the reopen checks and the
    docs table (docs/indexing-and-search.md) are all generated from `COLLECTION_OPTIONS`."""

    field: str
    """The `CollectionConfig` field it sets."""
    flag: str
    """Its flag, in every command that creates collections (`index`, `eval --via-index`)."""
    help: str
    """What it does (the default is added from `default`)."""
    default: str
    """The default, as help and docs show it."""
    kind: str = "int"
    """`int` (a positive number), `bool` (`--x` / `--no-x`) or `choice` (one of `choices`)."""
    choices: tuple[str, ...] = ()
    """The values of a `choice` option."""
    applies: str = BOTH
    """`both` backends, `server` only (the embedded engine refuses it) or `embedded` only (a server refuses it)."""
    search_checked: bool = True
    """A search depends on it, so the store checks it on every reopen even when it was not given; every option that
    is given for an existing collection must match it (it cannot take effect there), checked or not."""

    @property
    def dest(self) -> str:
        """The argparse destination."""
        return self.flag.lstrip("-").replace("-", "_")


COLLECTION_OPTIONS = (
    CollectionOption("hnsw_m", "--hnsw-m", "HNSW edges per node", "16"),
    CollectionOption("hnsw_ef_construct", "--hnsw-ef-construct", "HNSW build candidates", "100"),
    CollectionOption(
        "full_scan_threshold",
        "--full-scan-threshold-kb",
        "a search whose filter is estimated to match fewer KB of vectors than this (per segment; KB * 1024 / "
        "(4 * dim) vectors) is answered by an exact scan, not the HNSW graph; lower it for the graph to answer "
        "small filtered sets",
        "10000",
    ),
    CollectionOption(
        "indexing_threshold",
        "--indexing-threshold-kb",
        "KB of vectors in a segment before its HNSW graph is built",
        "the engine's",
        search_checked=False,
    ),
    CollectionOption(
        "max_segment_size",
        "--max-segment-size-kb",
        "KB of vectors per segment; building an index holds one segment's worth of memory, not the collection's",
        f"{DEFAULT_MAX_SEGMENT_SIZE}, 100k vectors at 512-d",
        applies=EMBEDDED,
        search_checked=False,
    ),
    CollectionOption("on_disk", "--on-disk", "keep original vectors on disk (mmap)", "in RAM", kind="bool"),
    CollectionOption(
        "quantization",
        "--quantization",
        "vector quantisation, searched with rescoring; a value other than the bundle's overrides it, with a warning",
        "the bundle's serving.quantization, the mode its towers were trained for",
        kind="choice",
        choices=QUANTIZATIONS,
    ),
    CollectionOption(
        "shard_number", "--shards", "shards of the collection", "the server's", applies=SERVER, search_checked=False
    ),
    CollectionOption(
        "replication_factor",
        "--replication-factor",
        "copies of each shard",
        "the server's",
        applies=SERVER,
        search_checked=False,
    ),
    CollectionOption(
        "write_consistency_factor",
        "--write-consistency",
        "replicas that must confirm a write (write_consistency_factor)",
        "the server's",
        applies=SERVER,
        search_checked=False,
    ),
)
OPTIONS_BY_FIELD = {o.field: o for o in COLLECTION_OPTIONS}
# Options a reopened collection must have as requested: anything else would silently serve another index.
CHECKED = ("dim", *(o.field for o in COLLECTION_OPTIONS if o.search_checked))
# The flag that sets each option, for messages.
FLAGS = {"dim": "the bundle's embedding_dim", **{o.field: o.flag for o in COLLECTION_OPTIONS}}
SERVER_ONLY = tuple(o.field for o in COLLECTION_OPTIONS if o.applies == SERVER)


class CollectionMismatch(ValueError):
    """A collection exists with other options than the ones asked for (raised before anything is written)."""


class DimensionMismatch(CollectionMismatch):
    """A collection exists with a different vector dimension than the bundle's."""


@dataclass(frozen=True)
class CollectionConfig:
    """How a collection is created (HNSW graph, storage placement, quantisation, server-side distribution)."""

    dim: int
    """Vector dimension (the bundle's embedding_dim)."""
    hnsw_m: int = 16
    """HNSW edges per node."""
    hnsw_ef_construct: int = 100
    """HNSW candidates while building the graph."""
    full_scan_threshold: int = 10_000
    """KB of vectors: a search whose filter (or segment) is estimated to match fewer is answered by an exact scan
    instead of the HNSW graph. Counted per segment, in vectors of this collection's size (KB * 1024 / (4 * dim))."""
    indexing_threshold: int | None = None
    """KB of vectors in a segment before its HNSW graph is built (None = the engine's default)."""
    max_segment_size: int | None = DEFAULT_MAX_SEGMENT_SIZE
    """Embedded engine only: KB of vectors (written vectors, each `4 * dim` bytes) per segment. The store seals the
    segment being written once this much went into it (builds its index, then writes into a new one), and the
    engine's optimiser merges no segments past it. So building holds one segment's worth of memory, not the
    collection's: about 18 KB per point of the segment at dim 512 with three named vectors, all of it pages of
    memory-mapped files. None: one segment grows until `optimize()`, which then holds that much per point of the
    whole collection. A server sizes its own segments (its optimiser runs in the background)."""
    on_disk: bool = False
    """Keep original vectors on disk (mmap) instead of in RAM."""
    quantization: str = "none"
    """`none`, `int8` (scalar) or `binary`; searches rescore with the original vectors."""
    shard_number: int | None = None
    """Server only: shards of the collection (None = the server's default; the embedded engine has one)."""
    replication_factor: int | None = None
    """Server only: copies of each shard (None = the server's default; the embedded engine has no replicas)."""
    write_consistency_factor: int | None = None
    """Server only: replicas that must confirm a write (None = the server's default)."""

    def __post_init__(self) -> None:
        if self.dim <= 0:
            raise ValueError(f"dim must be positive, got {self.dim}")
        if self.hnsw_m < 2 or self.hnsw_ef_construct < 4:
            raise ValueError(
                f"hnsw_m must be >= 2 and hnsw_ef_construct >= 4, got {self.hnsw_m}, {self.hnsw_ef_construct}"
            )
        if self.full_scan_threshold <= 0:
            raise ValueError(f"full_scan_threshold must be a positive number of KB, got {self.full_scan_threshold}")
        if self.max_segment_size is not None and self.max_segment_size <= 0:
            raise ValueError(f"max_segment_size must be a positive number of KB, got {self.max_segment_size}")
        if (
            self.max_segment_size is not None
            and self.indexing_threshold is not None
            and self.indexing_threshold > self.max_segment_size
        ):
            raise ValueError(
                f"indexing_threshold ({self.indexing_threshold} KB) must not exceed max_segment_size "
                f"({self.max_segment_size} KB): a sealed segment would never be indexed"
            )
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        for name in SERVER_ONLY:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (also what a collection's metadata records)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CollectionConfig:
        """Rebuilds a config from `to_dict`'s form; unknown keys are ignored (metadata of newer versions)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def check_congruent(
    name: str, existing: CollectionConfig, requested: CollectionConfig, only: tuple[str, ...] = CHECKED
) -> None:
    """Raises when an existing collection's options differ from the requested ones, naming both values of each.

    Args:
        name: Collection name (for the message).
        existing: What the collection was created with.
        requested: What the caller asks for.
        only: The options to compare (default: every option a search depends on).

    Raises:
        DimensionMismatch: The dimensions differ.
        CollectionMismatch: Any other compared option differs.
    """
    if "dim" in only and existing.dim != requested.dim:
        raise DimensionMismatch(
            f"collection {name!r} has dimension {existing.dim} but the bundle produces {requested.dim}: "
            "index into a new collection (one per bundle version), or pass --recreate to delete it and its points"
        )
    diffs = [
        f"{f} {getattr(existing, f)!r}, not the requested {getattr(requested, f)!r} ({FLAGS[f]})"
        for f in only
        if f != "dim" and getattr(existing, f) != getattr(requested, f)
    ]
    if diffs:
        raise CollectionMismatch(
            f"collection {name!r} exists with {'; '.join(diffs)}: index into another --collection, give the "
            "collection's own values, or pass --recreate to delete it (and every point in it) and rebuild it"
        )


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
    """uuid5 string (see `store.ids.point_id`)."""
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
    """What the indexer and search need from a vector store; `EdgeStore` and `ClientStore` implement it.

    Every data-plane call names its collection (as qdrant-client's methods take `collection_name`); a name may be an
    alias, resolved by the store at the call. A store keeps no "open collection".
    """

    def ensure_collection(self, name: str, config: CollectionConfig, identity: BundleIdentity) -> bool:
        """Creates the collection recording `identity` (True), or checks an existing one (False): its dimension,
        that `identity` is the bundle that wrote it, and its options (`store.identity.check_reopen`:
        DimensionMismatch, BundleMismatch, CollectionMismatch). `name` may be an alias."""
        ...

    def collection_config(self, name: str) -> CollectionConfig:
        """The options an existing collection (or alias) was created with (KeyError when absent)."""
        ...

    def collection_identity(self, name: str) -> BundleIdentity | None:
        """The bundle that created the collection (or alias); None when it recorded none (KeyError when absent)."""
        ...

    def delete_collection(self, name: str) -> None:
        """Deletes a collection (an alias: the collection it points at), its points and the aliases pointing at it
        (nothing when absent)."""
        ...

    def set_alias(self, alias: str, collection: str) -> None:
        """Points `alias` at `collection` in one atomic step (creating or moving the alias)."""
        ...

    def resolve(self, name: str) -> str:
        """The collection an alias points at, or `name` itself when it is no alias."""
        ...

    def aliases_of(self, collection: str) -> list[str]:
        """The aliases pointing at `collection`, sorted."""
        ...

    def retrieve(self, collection: str, ids: list[str], with_vectors: bool = False) -> dict[str, PointData]:
        """Those of `ids` that exist in the collection, with their payloads (and named vectors when asked)."""
        ...

    def upsert(self, collection: str, points: list[PointData]) -> None:
        """Writes points (overwriting same ids); returns once the store has applied them."""
        ...

    def flush(self, collection: str) -> None:
        """Makes every applied write durable; a checkpoint is written only after this returns."""
        ...

    def optimize(self, collection: str) -> None:
        """Builds search indexes (HNSW) over what was written."""
        ...

    def search(
        self,
        collection: str,
        vectors: np.ndarray,
        using: str,
        limit: int,
        filters: dict[str, Any] | None = None,
        options: SearchOptions = DEFAULT_SEARCH,
        with_payload: bool = True,
    ) -> list[list[Hit]]:
        """Nearest neighbours of each row of `vectors` (Q, D) by the named vector `using`, best first."""
        ...

    def count(self, collection: str, filters: dict[str, Any] | None = None) -> int:
        """Number of points (matching the payload filters)."""
        ...

    def dump(self, collection: str) -> dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]]:
        """Every point as id -> (payload, named vectors): for tests and small collections only."""
        ...

    def release(self, name: str) -> None:
        """Lets go of what the store holds of one collection (the embedded engine's loaded shard, and with it the
        engine's lock, so another process can open it); a later call on it loads it again."""
        ...

    def close(self) -> None:
        """Releases the store."""
        ...


def stored_point(record: Any) -> PointData:
    """A point read back from either backend (its records both have `id`, `vector`: named vectors or None, and
    `payload`)."""
    named = record.vector if isinstance(record.vector, dict) else {}
    vectors = {k: np.asarray(v, np.float32) for k, v in named.items()}
    return PointData(str(record.id), vectors, dict(record.payload or {}))


def read_metadata(path: Path) -> dict[str, Any]:
    """Reads a small JSON metadata file, `{}` when absent."""
    return json.loads(path.read_text()) if path.is_file() else {}


def write_metadata(path: Path, data: dict[str, Any]) -> None:
    """Writes a small JSON file atomically (temp file, fsync, rename): a reader sees the old or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
