"""The embedded vector store: Qdrant's in-process engine (`qdrant-edge-py`), one on-disk shard per collection."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe

from imgtxt.bundle import DISTANCE
from indexer.stores.base import (
    DEFAULT_SEARCH,
    VECTOR_NAMES,
    CollectionConfig,
    DimensionMismatch,
    Hit,
    PointData,
    SearchOptions,
    read_metadata,
)

logger = logging.getLogger(__name__)

METADATA = "imgtxt_collection.json"
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

    Args:
        root: Directory holding the collections (created when missing).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.shard: qe.EdgeShard | None = None
        self.name = ""

    def _path(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"invalid collection name {name!r}")
        return self.root / name

    def ensure_collection(self, name: str, config: CollectionConfig) -> None:
        """Creates the shard, or opens it after checking its dimension.

        Raises:
            DimensionMismatch: The existing collection has another dimension.
        """
        path = self._path(name)
        if (path / "edge_config.json").is_file():
            self.open_collection(name, expect_dim=config.dim)
            return
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
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=config.indexing_threshold),
        )
        self.shard = qe.EdgeShard.create(str(path), edge_config)
        self.shard.update(qe.UpdateOperation.create_field_index("kind", qe.PayloadSchemaType.Keyword))
        self.shard.flush()
        tmp = path / (METADATA + ".tmp")
        tmp.write_text(json.dumps({"name": name, "dim": config.dim, "distance": DISTANCE}) + "\n")
        os.replace(tmp, path / METADATA)
        self.name = name
        logger.info("collection created", extra={"collection": name, "path": str(path), "dim": config.dim})

    def delete_collection(self, name: str) -> None:
        """Closes and removes the collection's shard directory."""
        path = self._path(name)
        if self.name == name:
            self.close()
            self.name = ""
        if path.exists():
            shutil.rmtree(path)

    def open_collection(self, name: str, expect_dim: int | None = None) -> int:
        """Opens an existing shard and returns its dimension.

        Raises:
            KeyError: No such collection.
            DimensionMismatch: `expect_dim` given and different.
        """
        path = self._path(name)
        edge_cfg = read_metadata(path / "edge_config.json")
        if not edge_cfg:
            raise KeyError(f"collection {name!r} not found under {self.root}")
        dims = {v["size"] for v in edge_cfg.get("vectors", {}).values()}
        dim = read_metadata(path / METADATA).get("dim") or (dims.pop() if len(dims) == 1 else 0)
        if expect_dim is not None and dim != expect_dim:
            raise DimensionMismatch(
                f"collection {name!r} at {path} has dimension {dim} but the bundle produces {expect_dim}: "
                "index into a new collection (one per bundle version) or delete the old one"
            )
        if self.shard is None or self.name != name:
            self.close()
            self.shard = qe.EdgeShard.load(str(path))
            self.name = name
        return int(dim)

    def _shard(self) -> qe.EdgeShard:
        if self.shard is None:
            raise RuntimeError("no collection is open: call ensure_collection or open_collection first")
        return self.shard

    def upsert(self, points: list[PointData]) -> None:
        """Writes points; the engine applies them (and logs them to its WAL) before returning."""
        if not points:
            return
        batch = [
            qe.Point(p.id, {k: np.asarray(v, np.float32).tolist() for k, v in p.vectors.items()}, p.payload)
            for p in points
        ]
        self._shard().update(qe.UpdateOperation.upsert_points(batch))

    def flush(self) -> None:
        """Persists every applied write to the shard's segments."""
        self._shard().flush()

    def optimize(self) -> None:
        """Runs the engine's optimisers in-process (builds HNSW graphs over large enough segments)."""
        self._shard().optimize()

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
