"""The server vector store: a Qdrant server or cluster through `qdrant-client` (gRPC preferred), or its local mode."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlparse

import numpy as np
from qdrant_client import QdrantClient, models

from imgtxt.bundle import DISTANCE, BundleIdentity
from store.base import (
    DEFAULT_SEARCH,
    VECTOR_NAMES,
    CollectionConfig,
    Hit,
    PointData,
    SearchOptions,
    stored_point,
)
from store.identity import check_reopen
from store.retry import call_with_retry

logger = logging.getLogger(__name__)

DISTANCES = {"cosine": models.Distance.COSINE}
# Key of the collection metadata holding the config the collection was created with.
METADATA_KEY = "imgtxt"
# Key of the collection metadata holding the identity of the bundle that created it.
IDENTITY_METADATA_KEY = "imgtxt_bundle"


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


def config_from_info(info: models.CollectionInfo) -> CollectionConfig:
    """A collection's options from a server's `get_collection` answer (its live configuration)."""
    vectors = info.config.params.vectors
    params = next(iter(vectors.values())) if isinstance(vectors, dict) else vectors
    if params is None:
        raise ValueError("the collection has no dense vectors")
    quant = info.config.quantization_config
    hnsw = info.config.hnsw_config
    p = info.config.params
    return CollectionConfig(
        dim=params.size,
        hnsw_m=hnsw.m,
        hnsw_ef_construct=hnsw.ef_construct,
        full_scan_threshold=hnsw.full_scan_threshold,
        indexing_threshold=info.config.optimizer_config.indexing_threshold,
        on_disk=bool(params.on_disk),
        quantization="int8"
        if isinstance(quant, models.ScalarQuantization)
        else "binary"
        if isinstance(quant, models.BinaryQuantization)
        else "none",
        shard_number=p.shard_number,
        replication_factor=p.replication_factor,
        write_consistency_factor=p.write_consistency_factor,
    )


class ClientStore:
    """Collections on a Qdrant server (or in qdrant-client's local mode), with retries on transient errors.

    Every data-plane call names its collection, as qdrant-client's methods do; the server resolves aliases. The
    bundle that created a collection is recorded in the collection's own metadata (`imgtxt_bundle`, set by
    `create_collection` in the same call that creates it, kept by the server and by local mode across reopens; it
    needs a Qdrant server of version 1.16 or later, the first with collection metadata).

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

    def _call(self, fn: Any) -> Any:
        return call_with_retry(fn, attempts=self.retries)

    def ensure_collection(self, name: str, config: CollectionConfig, identity: BundleIdentity) -> bool:
        """Creates the collection recording `identity` (True), or checks an existing one (False).

        The requested config is also recorded in the collection's metadata (`imgtxt`), which is where local mode,
        which keeps no HNSW or quantisation settings, reads it back from.

        Raises:
            DimensionMismatch: The existing collection has another dimension.
            BundleMismatch: Another bundle created it.
            CollectionMismatch: It has another quantisation or HNSW configuration.
        """
        if self._call(lambda: self.client.collection_exists(name)):
            check_reopen(
                self.resolve(name), self.collection_config(name), self.collection_identity(name), config, identity
            )
            return False
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
                shard_number=config.shard_number,
                replication_factor=config.replication_factor,
                write_consistency_factor=config.write_consistency_factor,
                metadata={METADATA_KEY: config.to_dict(), IDENTITY_METADATA_KEY: identity.to_dict()},
            )
        )
        if not self.local:
            self._call(
                lambda: self.client.create_payload_index(name, "kind", models.PayloadSchemaType.KEYWORD, wait=True)
            )
        logger.info("collection created", extra={"collection": name, "bundle": identity.version, **config.to_dict()})
        return True

    def _info(self, name: str) -> models.CollectionInfo:
        if not self._call(lambda: self.client.collection_exists(name)):
            raise KeyError(f"collection {name!r} not found")
        return self._call(lambda: self.client.get_collection(name))

    def collection_config(self, name: str) -> CollectionConfig:
        """The collection's options: on a server from its live configuration, in local mode (which keeps no HNSW or
        quantisation settings) from the metadata recorded at creation.

        Raises:
            KeyError: No such collection (or alias).
        """
        info = self._info(name)
        recorded = (info.config.metadata or {}).get(METADATA_KEY)
        if self.local and isinstance(recorded, dict):
            return CollectionConfig.from_dict(recorded)
        return config_from_info(info)

    def collection_identity(self, name: str) -> BundleIdentity | None:
        """The bundle recorded in the collection's metadata at creation (None: created before that).

        Raises:
            KeyError: No such collection (or alias).
        """
        recorded = (self._info(name).config.metadata or {}).get(IDENTITY_METADATA_KEY)
        return BundleIdentity.from_dict(recorded) if isinstance(recorded, dict) else None

    def delete_collection(self, name: str) -> None:
        """Deletes the collection on the server, with its aliases (nothing when absent)."""
        if self._call(lambda: self.client.collection_exists(name)):
            target = self.resolve(name)
            self._call(lambda: self.client.delete_collection(target))

    def resolve(self, name: str) -> str:
        """The collection an alias points at, or `name`."""
        aliases = self._call(lambda: self.client.get_aliases()).aliases
        return next((a.collection_name for a in aliases if a.alias_name == name), name)

    def aliases_of(self, collection: str) -> list[str]:
        """The aliases pointing at `collection`."""
        target = self.resolve(collection)
        aliases = self._call(lambda: self.client.get_aliases()).aliases
        return sorted(a.alias_name for a in aliases if a.collection_name == target)

    def set_alias(self, alias: str, collection: str) -> None:
        """Points `alias` at `collection` with one `update_collection_aliases` call (delete + create, atomic on the
        server).

        Raises:
            KeyError: No such collection.
            ValueError: `alias` names a collection.
        """
        target = self.resolve(collection)
        if not self._call(lambda: self.client.collection_exists(target)):
            raise KeyError(f"collection {collection!r} not found")
        existing = {a.alias_name for a in self._call(lambda: self.client.get_aliases()).aliases}
        if alias not in existing and self._call(lambda: self.client.collection_exists(alias)):
            raise ValueError(f"{alias!r} is a collection; an alias cannot have a collection's name")
        ops: list[Any] = [models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias))]
        ops = ops if alias in existing else []
        ops.append(
            models.CreateAliasOperation(create_alias=models.CreateAlias(collection_name=target, alias_name=alias))
        )
        self._call(lambda: self.client.update_collection_aliases(change_aliases_operations=ops))
        logger.info("alias switched", extra={"alias": alias, "collection": target})

    def retrieve(self, collection: str, ids: list[str], with_vectors: bool = False) -> dict[str, PointData]:
        """The existing points among `ids`, with payloads (and vectors when asked)."""
        out: dict[str, PointData] = {}
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            records = self._call(
                lambda c=chunk: self.client.retrieve(collection, c, with_payload=True, with_vectors=with_vectors)
            )
            out.update((p.id, p) for p in map(stored_point, records))
        return out

    def upsert(self, collection: str, points: list[PointData]) -> None:
        """Writes points with their deterministic ids (never letting the client assign uuid4) and waits."""
        if not points:
            return
        structs = [
            models.PointStruct(
                id=p.id, vector={k: np.asarray(v, np.float32).tolist() for k, v in p.vectors.items()}, payload=p.payload
            )
            for p in points
        ]
        self._call(lambda: self.client.upsert(collection, points=structs, wait=True))

    def flush(self, collection: str) -> None:
        """Nothing to do: `upsert(wait=True)` returns once the server has applied and logged the write."""

    def optimize(self, collection: str) -> None:
        """Nothing to do: the server's optimisers build HNSW in the background."""

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
        responses = self._call(lambda: self.client.query_batch_points(collection, requests=requests))
        return [[Hit(str(p.id), float(p.score), dict(p.payload or {})) for p in r.points] for r in responses]

    def count(self, collection: str, filters: dict[str, Any] | None = None) -> int:
        """Exact number of points matching the filters."""
        return int(
            self._call(lambda: self.client.count(collection, count_filter=client_filter(filters), exact=True)).count
        )

    def dump(self, collection: str) -> dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]]:
        """Every point, scrolled page by page."""
        out: dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]] = {}
        offset = None
        while True:
            records, offset = self.client.scroll(
                collection, offset=offset, limit=1000, with_payload=True, with_vectors=True
            )
            out.update((p.id, (p.payload, p.vectors)) for p in map(stored_point, records))
            if offset is None:
                return out

    def release(self, name: str) -> None:
        """Nothing to do: the server holds the collection."""

    def close(self) -> None:
        """Closes the client."""
        self.client.close()
