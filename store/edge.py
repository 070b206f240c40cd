"""The embedded vector store: Qdrant's in-process engine (`qdrant-edge-py`), one on-disk shard per collection."""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe

from imgtxt.bundle import DISTANCE
from store.base import (
    DEFAULT_SEARCH,
    FLAGS,
    SERVER_ONLY,
    VECTOR_NAMES,
    CollectionConfig,
    Hit,
    PointData,
    SearchOptions,
    check_congruent,
    read_metadata,
    write_metadata,
)

logger = logging.getLogger(__name__)

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


class EdgeStore:
    """Collections are shard directories under `root` (`root/<collection>/`), persistent and HNSW-indexed.

    The engine has no aliases, so this store keeps them in `root/imgtxt_aliases.json` (alias -> collection),
    replaced atomically; every method that takes a collection name resolves an alias first.

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
        self.shard: qe.EdgeShard | None = None
        self.name = ""
        # Seconds spent optimising (sealing full segments, and `optimize()`) since this store was made.
        self.optimize_seconds = 0.0
        self._seal_bytes: int | None = None
        self._vector_bytes = 0
        self._unsealed = 0

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

    def ensure_collection(self, name: str, config: CollectionConfig) -> bool:
        """Creates the shard (True), or opens it (False) after checking that it has the requested options.

        Raises:
            ValueError: A server-only option (shards, replicas, write consistency) was asked for.
            DimensionMismatch: The existing collection has another dimension.
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
            check_congruent(name, self.collection_config(name), config)
            self.open_collection(name)
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
        self.close()
        self.shard = qe.EdgeShard.create(str(path), edge_config)
        self.shard.update(qe.UpdateOperation.create_field_index("kind", qe.PayloadSchemaType.Keyword))
        self.shard.flush()
        write_metadata(path / METADATA, {"name": path.name, "distance": DISTANCE, **config.to_dict()})
        self.name = path.name
        self._track(config)
        logger.info("collection created", extra={"collection": path.name, "path": str(path), **config.to_dict()})
        return True

    def delete_collection(self, name: str) -> None:
        """Closes and removes the collection's shard directory, and the aliases pointing at it."""
        path = self._path(name)
        if self.name == path.name:
            self.close()
            self.name = ""
        aliases = self._aliases()
        kept = {a: c for a, c in aliases.items() if c != path.name}
        if kept != aliases:
            write_metadata(self.root / ALIASES, kept)
        if path.exists():
            shutil.rmtree(path)

    def open_collection(self, name: str) -> int:
        """Opens an existing shard (`name` may be an alias) and returns its dimension.

        Raises:
            KeyError: No such collection.
        """
        path = self._path(name)
        config = self.collection_config(name)
        if self.shard is None or self.name != path.name:
            self.close()
            self.shard = qe.EdgeShard.load(str(path))
            self.name = path.name
            self._track(config)
        return config.dim

    def _track(self, config: CollectionConfig) -> None:
        """Starts counting the bytes written towards the open collection's next seal (points written before it was
        opened are not counted: the first segment may reach twice the size)."""
        self._seal_bytes = config.max_segment_size * 1024 if config.max_segment_size else None
        self._vector_bytes = 4 * config.dim
        self._unsealed = 0

    def retrieve(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Payloads of the existing points among `ids`."""
        out: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), 1000):
            chunk: list[int | uuid.UUID | str] = list(ids[start : start + 1000])
            for r in self._shard().retrieve(chunk, True, False):
                out[str(r.id)] = dict(r.payload or {})
        return out

    def _shard(self) -> qe.EdgeShard:
        if self.shard is None:
            raise RuntimeError("no collection is open: call ensure_collection or open_collection first")
        return self.shard

    def upsert(self, points: list[PointData]) -> None:
        """Writes points; the engine applies them (and logs them to its WAL) before returning. Seals the segment
        being written when it is full (see the class docstring), so a call may also build an index."""
        if not points:
            return
        batch = [
            qe.Point(p.id, {k: np.asarray(v, np.float32).tolist() for k, v in p.vectors.items()}, p.payload)
            for p in points
        ]
        self._shard().update(qe.UpdateOperation.upsert_points(batch))
        self._unsealed += self._vector_bytes * sum(len(p.vectors) for p in points)
        if self._seal_bytes is not None and self._unsealed >= self._seal_bytes:
            t0 = time.perf_counter()
            self.optimize()
            logger.info(
                "segment sealed",
                extra={"collection": self.name, "seconds": round(time.perf_counter() - t0, 3)},
            )

    def flush(self) -> None:
        """Persists every applied write to the shard's segments."""
        self._shard().flush()

    def optimize(self) -> None:
        """Runs the engine's optimisers in-process (builds HNSW graphs over large enough segments), then flushes:
        the segments an optimisation replaced stay mapped, and their pages resident, until the next flush."""
        t0 = time.perf_counter()
        shard = self._shard()
        shard.optimize()
        shard.flush()
        self._unsealed = 0
        self.optimize_seconds += time.perf_counter() - t0

    def search(
        self,
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
        results = self._shard().query_batch(qe.QueryBatchRequest(requests))
        return [[Hit(str(p.id), float(p.score), dict(p.payload or {})) for p in res] for res in results]

    def count(self, filters: dict[str, Any] | None = None) -> int:
        """Exact number of points matching the filters."""
        return int(self._shard().count(qe.CountRequest(exact=True, filter=edge_filter(filters))))

    def dump(self) -> dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]]:
        """Every point, scrolled page by page."""
        out: dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]] = {}
        offset = None
        while True:
            records, offset = self._shard().scroll(
                qe.ScrollRequest(offset=offset, limit=1000, with_payload=True, with_vector=True)
            )
            for r in records:
                vec = r.vector if isinstance(r.vector, dict) else {}
                out[str(r.id)] = (dict(r.payload or {}), {k: np.asarray(v, np.float32) for k, v in vec.items()})
            if offset is None:
                return out

    def close(self) -> None:
        """Flushes and closes the open shard."""
        if self.shard is not None:
            self.shard.close()
            self.shard = None
