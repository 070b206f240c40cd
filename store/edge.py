"""The embedded vector store: Qdrant's in-process engine (`qdrant-edge-py`), one on-disk shard per collection."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe

from imgtxt.bundle import DISTANCE, BundleIdentity
from imgtxt.errors import ImgTxtError
from store.base import (
    DEFAULT_SEARCH,
    FLAGS,
    SERVER_ONLY,
    VECTOR_NAMES,
    CollectionConfig,
    Hit,
    PointData,
    SearchOptions,
    read_metadata,
    stored_point,
    write_metadata,
)
from store.identity import IDENTITY_KEY, check_reopen

logger = logging.getLogger(__name__)

# The store's sidecar of each collection: its creation options and the bundle that created it.
METADATA = "imgtxt_collection.json"
# The store's aliases (alias -> collection), beside the collections: the engine itself has none.
ALIASES = "imgtxt_aliases.json"
# The one distance constant of the project drives collection creation (a KeyError here means a new distance was
# introduced without teaching the store about it).
DISTANCES = {"cosine": qe.Distance.Cosine}


def _quantization(config: CollectionConfig) -> Any:
    if config.quantization == "int8":
        return qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=0.99, always_ram=True)
    if config.quantization == "binary":
        return qe.BinaryQuantizationConfig(always_ram=True)
    return None


def edge_filter(filters: dict[str, Any] | None) -> qe.Filter | None:
    """Payload equality filters as an engine filter (all must match)."""
    if not filters:
        return None
    return qe.Filter(must=[qe.FieldCondition(key=k, match=qe.MatchValue(v)) for k, v in sorted(filters.items())])


@dataclass
class _Seal:
    """How much was written into a collection's segment since its last optimisation, and when to seal it."""

    limit: int | None
    """Bytes of vectors per segment (None: never seal)."""
    vector_bytes: int
    """Bytes of one vector (`4 * dim`)."""
    unsealed: int = 0
    """Bytes written since the last optimisation."""


class EdgeStore:
    """Collections are shard directories under `root` (`root/<collection>/`), persistent and HNSW-indexed.

    The engine has no aliases, so this store keeps them in `root/imgtxt_aliases.json` (alias -> collection),
    replaced atomically; every method that takes a collection name resolves an alias first. Each collection's
    shard is loaded on its first use and stays loaded until `close` (or its deletion), so a reader that follows an
    alias to another collection loads that one beside it. The bundle that created a collection is recorded in the
    store's own sidecar `root/<collection>/imgtxt_collection.json` (the engine keeps no metadata of ours), written
    atomically before the collection is used and removed with it.

    The engine runs its optimisers only when asked, so the store seals segments itself: once the vectors written
    since the last optimisation reach the collection's `max_segment_size`, `upsert` optimises (builds that segment's
    index) and flushes. The engine keeps every page it wrote or read through its memory-mapped files resident, and
    keeps the segments an optimisation replaced mapped until the next flush, so this bounds a job's memory by one
    segment rather than by the collection.

    Args:
        root: Directory holding the collections (created when missing).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._shards: dict[str, qe.EdgeShard] = {}
        self._seals: dict[str, _Seal] = {}
        self._lock = threading.Lock()
        # Seconds spent optimising (sealing full segments, and `optimize()`) since this store was made.
        self.optimize_seconds = 0.0

    @staticmethod
    def _check_name(name: str) -> str:
        if not name or "/" in name or name.startswith(".") or name.startswith("_") or name == ALIASES:
            raise ValueError(f"invalid collection name {name!r} (no '/', no leading '.' or '_')")
        return name

    def _path(self, name: str) -> Path:
        return self.root / self.resolve(self._check_name(name))

    def _aliases(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in read_metadata(self.root / ALIASES).items()}

    def resolve(self, name: str) -> str:
        """The collection `name` points at when it is an alias, else `name`."""
        return self._aliases().get(name, name)

    def aliases_of(self, collection: str) -> list[str]:
        """The aliases pointing at `collection`."""
        target = self.resolve(collection)
        return sorted(a for a, c in self._aliases().items() if c == target)

    def set_alias(self, alias: str, collection: str) -> None:
        """Points `alias` at `collection`: one atomic replace of the alias file, so a reader sees the old target or
        the new one.

        Raises:
            KeyError: No such collection.
            ValueError: `alias` names a collection (an alias cannot shadow one).
        """
        self._check_name(alias)
        target = self.resolve(self._check_name(collection))
        if not (self.root / target / "edge_config.json").is_file():
            raise KeyError(f"collection {collection!r} not found under {self.root}")
        if (self.root / alias / "edge_config.json").is_file():
            raise ValueError(f"{alias!r} is a collection under {self.root}; an alias cannot have a collection's name")
        self.root.mkdir(parents=True, exist_ok=True)
        write_metadata(self.root / ALIASES, {**self._aliases(), alias: target})
        logger.info("alias switched", extra={"alias": alias, "collection": target})

    def collection_config(self, name: str) -> CollectionConfig:
        """The options the collection was created with, read from the engine's own `edge_config.json`.

        Raises:
            KeyError: No such collection.
        """
        path = self._path(name)
        cfg = read_metadata(path / "edge_config.json")
        if not cfg:
            raise KeyError(f"collection {name!r} not found under {self.root}")
        vectors = list(cfg.get("vectors", {}).values())
        first = vectors[0] if vectors else {}
        quant = first.get("quantization_config") or {}
        hnsw = cfg.get("hnsw_config") or {}
        defaults = CollectionConfig(dim=1)
        return CollectionConfig(
            dim=int(first["size"]),
            hnsw_m=int(hnsw.get("m", defaults.hnsw_m)),
            hnsw_ef_construct=int(hnsw.get("ef_construct", defaults.hnsw_ef_construct)),
            full_scan_threshold=int(hnsw.get("full_scan_threshold", defaults.full_scan_threshold)),
            indexing_threshold=(cfg.get("optimizers") or {}).get("indexing_threshold"),
            max_segment_size=(cfg.get("optimizers") or {}).get("max_segment_size"),
            on_disk=bool(first.get("on_disk", False)),
            quantization="int8" if "scalar" in quant else "binary" if "binary" in quant else "none",
        )

    def collection_identity(self, name: str) -> BundleIdentity | None:
        """The bundle recorded in the collection's sidecar when it was created (None: created before that).

        Raises:
            KeyError: No such collection.
        """
        path = self._path(name)
        if not (path / "edge_config.json").is_file():
            raise KeyError(f"collection {name!r} not found under {self.root}")
        recorded = read_metadata(path / METADATA).get(IDENTITY_KEY)
        return BundleIdentity.from_dict(recorded) if isinstance(recorded, dict) else None

    def ensure_collection(self, name: str, config: CollectionConfig, identity: BundleIdentity) -> bool:
        """Creates the shard recording `identity` (True), or checks the existing one (False).

        Raises:
            ValueError: A server-only option (shards, replicas, write consistency) was asked for.
            DimensionMismatch: The existing collection has another dimension.
            BundleMismatch: Another bundle created it.
            CollectionMismatch: It has another quantisation or HNSW configuration.
        """
        server_only = {f: getattr(config, f) for f in SERVER_ONLY if getattr(config, f) not in (None, 1)}
        if server_only:
            given = ", ".join(f"{FLAGS[f]} {v}" for f, v in server_only.items())
            raise ValueError(
                f"the embedded engine holds a collection in one shard with no replicas, so {given} cannot apply: "
                "shards, replication and write consistency need a Qdrant server (--store qdrant://host:6334)"
            )
        path = self._path(name)
        if (path / "edge_config.json").is_file():
            check_reopen(path.name, self.collection_config(name), self.collection_identity(name), config, identity)
            self._shard(path.name)
            return False
        path.mkdir(parents=True, exist_ok=True)
        params = {
            v: qe.EdgeVectorParams(
                size=config.dim,
                distance=DISTANCES[DISTANCE],
                on_disk=config.on_disk,
                quantization_config=_quantization(config),
            )
            for v in VECTOR_NAMES
        }
        edge_config = qe.EdgeConfig(
            vectors=params,
            hnsw_config=qe.HnswIndexConfig(
                m=config.hnsw_m, ef_construct=config.hnsw_ef_construct, full_scan_threshold=config.full_scan_threshold
            ),
            optimizers=qe.EdgeOptimizersConfig(
                indexing_threshold=config.indexing_threshold, max_segment_size=config.max_segment_size
            ),
        )
        # The identity is on disk before the engine's config: a collection that exists always records its bundle.
        write_metadata(
            path / METADATA,
            {"name": path.name, "distance": DISTANCE, **config.to_dict(), IDENTITY_KEY: identity.to_dict()},
        )
        with self._lock:
            shard = _held(path, lambda: qe.EdgeShard.create(str(path), edge_config))
            shard.update(qe.UpdateOperation.create_field_index("kind", qe.PayloadSchemaType.Keyword))
            shard.flush()
            self._shards[path.name] = shard
            self._seals[path.name] = _seal(config)
        logger.info(
            "collection created",
            extra={"collection": path.name, "path": str(path), "bundle": identity.version, **config.to_dict()},
        )
        return True

    def delete_collection(self, name: str) -> None:
        """Closes and removes the collection's shard directory, and the aliases pointing at it."""
        path = self._path(name)
        self.release(name)
        aliases = self._aliases()
        kept = {a: c for a, c in aliases.items() if c != path.name}
        if kept != aliases:
            write_metadata(self.root / ALIASES, kept)
        if path.exists():
            shutil.rmtree(path)

    def _shard(self, name: str) -> qe.EdgeShard:
        """The loaded shard of collection (or alias) `name`, loading it on first use.

        Raises:
            KeyError: No such collection.
            StoreLocked: Another process holds it.
        """
        path = self._path(name)
        with self._lock:
            shard = self._shards.get(path.name)
            if shard is not None:
                return shard
        config = self.collection_config(name)  # KeyError when absent
        with self._lock:
            if path.name not in self._shards:
                self._shards[path.name] = _held(path, lambda: qe.EdgeShard.load(str(path)))
                self._seals[path.name] = _seal(config)
            return self._shards[path.name]

    def retrieve(self, collection: str, ids: list[str], with_vectors: bool = False) -> dict[str, PointData]:
        """The existing points among `ids`, with payloads (and vectors when asked)."""
        shard = self._shard(collection)
        out: dict[str, PointData] = {}
        for start in range(0, len(ids), 1000):
            chunk: list[int | uuid.UUID | str] = list(ids[start : start + 1000])
            out.update((p.id, p) for p in map(stored_point, shard.retrieve(chunk, True, with_vectors)))
        return out

    def upsert(self, collection: str, points: list[PointData]) -> None:
        """Writes points; the engine applies them (and logs them to its WAL) before returning. Seals the segment
        being written when it is full (see the class docstring), so a call may also build an index."""
        if not points:
            return
        shard = self._shard(collection)
        batch = [
            qe.Point(p.id, {k: np.asarray(v, np.float32).tolist() for k, v in p.vectors.items()}, p.payload)
            for p in points
        ]
        shard.update(qe.UpdateOperation.upsert_points(batch))
        seal = self._seals[self.resolve(collection)]
        seal.unsealed += seal.vector_bytes * sum(len(p.vectors) for p in points)
        if seal.limit is not None and seal.unsealed >= seal.limit:
            t0 = time.perf_counter()
            self.optimize(collection)
            logger.info(
                "segment sealed",
                extra={"collection": self.resolve(collection), "seconds": round(time.perf_counter() - t0, 3)},
            )

    def flush(self, collection: str) -> None:
        """Persists every applied write to the shard's segments."""
        self._shard(collection).flush()

    def optimize(self, collection: str) -> None:
        """Runs the engine's optimisers in-process (builds HNSW graphs over large enough segments), then flushes:
        the segments an optimisation replaced stay mapped, and their pages resident, until the next flush."""
        t0 = time.perf_counter()
        shard = self._shard(collection)
        shard.optimize()
        shard.flush()
        self._seals[self.resolve(collection)].unsealed = 0
        self.optimize_seconds += time.perf_counter() - t0

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
        """Nearest neighbours of each query row, as one planned batch."""
        params = qe.SearchParams(
            hnsw_ef=options.hnsw_ef,
            exact=options.exact,
            quantization=qe.QuantizationSearchParams(rescore=options.rescore, oversampling=options.oversampling),
        )
        flt = edge_filter(filters)
        requests = [
            qe.QueryRequest(
                limit=limit,
                query=qe.Query.Nearest(np.asarray(row, np.float32).tolist(), using=using),
                filter=flt,
                params=params,
                with_payload=with_payload,
            )
            for row in np.atleast_2d(vectors)
        ]
        results = self._shard(collection).query_batch(qe.QueryBatchRequest(requests))
        return [[Hit(str(p.id), float(p.score), dict(p.payload or {})) for p in res] for res in results]

    def count(self, collection: str, filters: dict[str, Any] | None = None) -> int:
        """Exact number of points matching the filters."""
        return int(self._shard(collection).count(qe.CountRequest(exact=True, filter=edge_filter(filters))))

    def dump(self, collection: str) -> dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]]:
        """Every point, scrolled page by page."""
        shard = self._shard(collection)
        out: dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]] = {}
        offset = None
        while True:
            records, offset = shard.scroll(
                qe.ScrollRequest(offset=offset, limit=1000, with_payload=True, with_vector=True)
            )
            out.update((p.id, (p.payload, p.vectors)) for p in map(stored_point, records))
            if offset is None:
                return out

    def release(self, name: str) -> None:
        """Flushes and closes the collection's shard, releasing the engine's lock on it (nothing when not loaded)."""
        target = self.resolve(self._check_name(name))
        with self._lock:
            shard = self._shards.pop(target, None)
            self._seals.pop(target, None)
        if shard is not None:
            shard.close()

    def shard_info(self, collection: str) -> Any:
        """The engine's description of the collection's shard (segments, points, indexed vectors)."""
        return self._shard(collection).info()

    def close(self) -> None:
        """Flushes and closes every loaded shard."""
        with self._lock:
            shards, self._shards = self._shards, {}
            self._seals = {}
        for shard in shards.values():
            shard.close()


def _seal(config: CollectionConfig) -> _Seal:
    """Starts counting the bytes written towards a collection's next seal (points written before it was loaded are
    not counted: the first segment may reach twice the size)."""
    return _Seal(config.max_segment_size * 1024 if config.max_segment_size else None, 4 * config.dim)


class StoreLocked(ImgTxtError):
    """The embedded engine's collection is held by another process (its write-ahead log is locked)."""


def _holders(path: Path) -> list[str]:
    """The processes holding a lock on a file under `path` (`pid (command)`), read from /proc/locks (Linux only;
    elsewhere, or when it cannot be read, none are named)."""
    # The engine locks its write-ahead log's directory (flock); any file or directory of the collection counts.
    ids = set()
    for f in [path, *path.rglob("*")]:
        st = f.stat()
        ids.add(f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}")
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    found = set()
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF": the pid, then major:minor:inode of the locked file.
        parts = line.split()
        at = next((i for i, p in enumerate(parts) if p.count(":") == 2), None)
        if at is None or parts[at] not in ids or not parts[at - 1].isdigit():
            continue
        pid = parts[at - 1]
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            command = "?"
        found.add(f"pid {pid} ({command[:120]})")
    return sorted(found)


def _held(path: Path, open_shard: Callable[[], qe.EdgeShard]) -> qe.EdgeShard:
    """Opens a shard, turning the engine's lock failure (a raw `WouldBlock`) into an error naming the path and,
    where the system says, the process that holds it.

    Raises:
        StoreLocked: Another process has the collection open.
    """
    try:
        return open_shard()
    except Exception as exc:
        if "WouldBlock" not in str(exc):
            raise
        holders = _holders(path)
        who = ", ".join(holders) if holders else "another process"
        raise StoreLocked(
            f"the embedded store's collection {path} is in use by {who}: the embedded engine lets one process open "
            "a collection at a time; stop that process (a running `imgtxt index`, `serve-search` or `demo` on this "
            "store), or serve the collections from a Qdrant server (--store qdrant://host:6334) for shared use"
        ) from None
