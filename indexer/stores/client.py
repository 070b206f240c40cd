"""The server vector store: a Qdrant server or cluster through `qdrant-client` (gRPC preferred), or its local mode."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlparse

import numpy as np
from qdrant_client import QdrantClient, models

from imgtxt.bundle import DISTANCE
from indexer.stores.base import (
    DEFAULT_SEARCH,
    VECTOR_NAMES,
    CollectionConfig,
    DimensionMismatch,
    Hit,
    PointData,
    SearchOptions,
)
from indexer.stores.retry import call_with_retry

logger = logging.getLogger(__name__)

DISTANCES = {"cosine": models.Distance.COSINE}


def _client(location: str, api_key: str | None, timeout: float) -> QdrantClient:
    if location == ":memory:":
        return QdrantClient(":memory:")
    if location.startswith("local:"):
        return QdrantClient(path=location[len("local:") :])
    url = urlparse(location)
    if url.scheme == "qdrant":
        # qdrant://host:port names the gRPC port directly.
        return QdrantClient(
            host=url.hostname or "localhost",
            grpc_port=url.port or 6334,
            prefer_grpc=True,
            api_key=api_key,
            timeout=int(timeout),
        )
    return QdrantClient(url=location, prefer_grpc=True, api_key=api_key, timeout=int(timeout))


def client_filter(filters: dict[str, Any] | None) -> models.Filter | None:
    """Payload equality filters as a qdrant-client filter (all must match)."""
    if not filters:
        return None
    return models.Filter(
        must=[models.FieldCondition(key=k, match=models.MatchValue(value=v)) for k, v in sorted(filters.items())]
    )


def _quantization(config: CollectionConfig) -> Any:
    if config.quantization == "int8":
        return models.ScalarQuantization(
            scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8, quantile=0.99, always_ram=True)
        )
    if config.quantization == "binary":
        return models.BinaryQuantization(binary=models.BinaryQuantizationConfig(always_ram=True))
    return None


class ClientStore:
    """A collection on a Qdrant server (or in qdrant-client's local mode), with retries on transient errors.

    Args:
        location: `qdrant://host:port`, `http(s)://host:port`, `:memory:` or `local:PATH`.
        api_key: Server API key.
        timeout: Per-request timeout in seconds.
        retries: Attempts per call on retryable errors.
    """

    def __init__(self, location: str, api_key: str | None = None, timeout: float = 30.0, retries: int = 5) -> None:
        self.client = _client(location, api_key, timeout)
        # Local mode is brute force: payload indexes and search params have no effect there (and warn).
        self.local = location == ":memory:" or location.startswith("local:")
        self.retries = retries
        self.name = ""

    def _call(self, fn: Any) -> Any:
        return call_with_retry(fn, attempts=self.retries)

    def ensure_collection(self, name: str, config: CollectionConfig) -> None:
        """Creates the collection, or checks an existing one's dimension.

        Raises:
            DimensionMismatch: The existing collection has another dimension.
        """
        if self._call(lambda: self.client.collection_exists(name)):
            self.open_collection(name, expect_dim=config.dim)
            return
        vectors = {
            v: models.VectorParams(size=config.dim, distance=DISTANCES[DISTANCE], on_disk=config.on_disk)
            for v in VECTOR_NAMES
        }
        self._call(
            lambda: self.client.create_collection(
                name,
                vectors_config=vectors,
                hnsw_config=models.HnswConfigDiff(
                    m=config.hnsw_m,
                    ef_construct=config.hnsw_ef_construct,
                    full_scan_threshold=config.full_scan_threshold,
                ),
                optimizers_config=models.OptimizersConfigDiff(indexing_threshold=config.indexing_threshold),
                quantization_config=_quantization(config),
            )
        )
        if not self.local:
            self._call(
                lambda: self.client.create_payload_index(name, "kind", models.PayloadSchemaType.KEYWORD, wait=True)
            )
        self.name = name

    def delete_collection(self, name: str) -> None:
        """Deletes the collection on the server (nothing when absent)."""
        if self._call(lambda: self.client.collection_exists(name)):
            self._call(lambda: self.client.delete_collection(name))

    def open_collection(self, name: str, expect_dim: int | None = None) -> int:
        """Checks the collection exists and returns its dimension.

        Raises:
            KeyError: No such collection.
            DimensionMismatch: `expect_dim` given and different.
        """
        if not self._call(lambda: self.client.collection_exists(name)):
            raise KeyError(f"collection {name!r} not found")
        info = self._call(lambda: self.client.get_collection(name))
        vectors = info.config.params.vectors
        sizes = {p.size for p in vectors.values()} if isinstance(vectors, dict) else {vectors.size}
        dim = sizes.pop() if len(sizes) == 1 else 0
        if expect_dim is not None and dim != expect_dim:
            raise DimensionMismatch(
                f"collection {name!r} has dimension {dim} but the bundle produces {expect_dim}: "
                "index into a new collection (one per bundle version) or delete the old one"
            )
        self.name = name
        return int(dim)

    def upsert(self, points: list[PointData]) -> None:
        """Writes points with their deterministic ids (never letting the client assign uuid4) and waits."""
        if not points:
            return
        structs = [
            models.PointStruct(
                id=p.id, vector={k: np.asarray(v, np.float32).tolist() for k, v in p.vectors.items()}, payload=p.payload
            )
            for p in points
        ]
        self._call(lambda: self.client.upsert(self.name, points=structs, wait=True))

    def flush(self) -> None:
        """Nothing to do: `upsert(wait=True)` returns once the server has applied and logged the write."""

    def optimize(self) -> None:
        """Nothing to do: the server's optimisers build HNSW in the background."""

    def search(
        self,
        vectors: np.ndarray,
        using: str,
        limit: int,
        filters: dict[str, Any] | None = None,
        options: SearchOptions = DEFAULT_SEARCH,
        with_payload: bool = True,
    ) -> list[list[Hit]]:
        """Nearest neighbours of each query row, as one batch request."""
        params = (
            None
            if self.local
            else models.SearchParams(
                hnsw_ef=options.hnsw_ef,
                exact=options.exact,
                quantization=models.QuantizationSearchParams(
                    rescore=options.rescore, oversampling=options.oversampling
                ),
            )
        )
        flt = client_filter(filters)
        requests = [
            models.QueryRequest(
                query=np.asarray(row, np.float32).tolist(),
                using=using,
                limit=limit,
                filter=flt,
                params=params,
                with_payload=with_payload,
            )
            for row in np.atleast_2d(vectors)
        ]
        responses = self._call(lambda: self.client.query_batch_points(self.name, requests=requests))
        return [[Hit(str(p.id), float(p.score), dict(p.payload or {})) for p in r.points] for r in responses]

    def count(self, filters: dict[str, Any] | None = None) -> int:
        """Exact number of points matching the filters."""
        return int(
            self._call(lambda: self.client.count(self.name, count_filter=client_filter(filters), exact=True)).count
        )

    def dump(self) -> dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]]:
        """Every point, scrolled page by page."""
        out: dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]] = {}
        offset = None
        while True:
            records, offset = self.client.scroll(
                self.name, offset=offset, limit=1000, with_payload=True, with_vectors=True
            )
            for r in records:
                vec = r.vector if isinstance(r.vector, dict) else {}
                out[str(r.id)] = (dict(r.payload or {}), {k: np.asarray(v, np.float32) for k, v in vec.items()})
            if offset is None:
                return out

    def close(self) -> None:
        """Closes the client."""
        self.client.close()
