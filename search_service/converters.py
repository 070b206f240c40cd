"""The search service's one protocol mapping: gRPC messages and HTTP bodies in, domain objects out, and back.

Both handlers (`search_service.servicer`, `search_service.web`) convert here and only here, so the two protocols
apply the same rules: a query is built by keyword, a vector must be non-empty and finite, filter values follow the
CLI's rule (`imgtxt.flags.parse_filters`: a value that reads as a JSON integer or boolean matches as one), and the
service's description is one `SearchInfo`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgtxt.errors import InvalidInput
from imgtxt.flags import parse_filters
from imgtxt.v1 import search_pb2 as pb
from imgtxt.wire import WIRE_DTYPE
from search.backend import Query, SearchBackend, SearchResult, hit_fields, payload_json
from search_service.models import EmbeddingsBody, HitOut, SearchBody, SearchOut


@dataclass(frozen=True)
class SearchInfo:
    """What the search service searches, as both protocols report it."""

    collection: str
    """Collection (or alias) searched."""
    bundle_version: str
    """Bundle version whose towers encode the queries."""
    dim: int
    """Dimension of the space."""
    points: dict[str, int]
    """Points per kind in the collection."""
    max_limit: int
    """Largest `limit`."""
    max_text_chars: int
    """Longest text query, in characters."""
    max_image_bytes: int
    """Largest image query, in bytes."""


def search_info(backend: SearchBackend) -> SearchInfo:
    """The backend's description."""
    info = backend.info()
    return SearchInfo(
        collection=str(info["collection"]),
        bundle_version=str(info["bundle_version"]),
        dim=int(info["dim"]),
        points={str(kind): int(n) for kind, n in info["points"].items()},
        max_limit=int(info["max_limit"]),
        max_text_chars=int(info["max_text_chars"]),
        max_image_bytes=int(info["max_image_bytes"]),
    )


def info_to_grpc(info: SearchInfo) -> pb.SearchInfoResponse:
    """`SearchInfoResponse` of a description."""
    return pb.SearchInfoResponse(
        collection=info.collection,
        bundle_version=info.bundle_version,
        dim=info.dim,
        points=info.points,
        max_limit=info.max_limit,
        max_text_chars=info.max_text_chars,
        max_image_bytes=info.max_image_bytes,
    )


def query_vector(values: np.ndarray, field: str) -> np.ndarray:
    """A query vector, checked: 1-D, not empty, every value finite.

    Raises:
        InvalidInput: Naming `field`: empty, or holding NaN or infinity (which would match nothing, silently).
    """
    vector = np.asarray(values, np.float32).reshape(-1)
    if vector.size == 0:
        raise InvalidInput(f"{field} is empty: give the query vector's values")
    bad = np.flatnonzero(~np.isfinite(vector))
    if bad.size:
        raise InvalidInput(f"{field} must hold finite values: {vector[bad[0]]} at index {bad[0]} ({bad.size} in all)")
    return vector


def _grpc_vector(vector: pb.QueryVector) -> np.ndarray:
    if not vector.data:
        raise InvalidInput("vector.data is empty: give dim little-endian float32 values")
    if vector.dim <= 0:
        raise InvalidInput(f"vector.dim must be the vector's dimension (> 0), got {vector.dim}")
    expected = vector.dim * WIRE_DTYPE.itemsize
    if len(vector.data) != expected:
        raise InvalidInput(f"vector.data has {len(vector.data)} bytes; vector.dim={vector.dim} needs {expected}")
    return query_vector(np.frombuffer(vector.data, WIRE_DTYPE), "vector.data")


def filters_from(filters: Mapping[str, Any], field: str = "filters") -> dict[str, Any]:
    """Payload filters under the CLI's value rule, whichever protocol they came in.

    Strings go through `imgtxt.flags.parse_filters` (`"1"` matches the integer 1, `"true"` the boolean); integers
    and booleans sent as such (HTTP/JSON) stay what they are.

    Raises:
        InvalidInput: A key that cannot name a payload field (empty, or holding `=`).
    """
    out: dict[str, Any] = {}
    for key, value in filters.items():
        if not key or "=" in key:
            raise InvalidInput(f"{field} key {key!r} is not a payload field name (empty or holding '=')")
        out.update(parse_filters([f"{key}={value}"]) if isinstance(value, str) else {key: value})
    return out


def query_from_grpc(request: pb.SearchRequest) -> Query:
    """The domain query of a gRPC request (the oneof says which field is the query).

    Raises:
        InvalidInput: A malformed vector or filter, naming the field.
    """
    which = request.WhichOneof("query")
    return Query(
        text=request.text if which == "text" else None,
        image=request.image if which == "image" else None,
        vector=_grpc_vector(request.vector) if which == "vector" else None,
        point_id=request.point_id if which == "point_id" else None,
        target=request.target or None,
        limit=request.limit or 10,
        filters=filters_from(request.filters),
    )


def decode_base64(value: str, field: str) -> bytes:
    """Bytes of a base64 field.

    Raises:
        InvalidInput: Not valid base64, naming the field.
    """
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{field} is not valid base64 ({exc})") from None


def query_from_http(body: SearchBody) -> Query:
    """The domain query of a `POST /v1/search` body.

    Raises:
        InvalidInput: Bad base64, a malformed vector or filter, naming the field.
    """
    return Query(
        text=body.text,
        image=decode_base64(body.image_base64, "image_base64") if body.image_base64 is not None else None,
        vector=query_vector(np.asarray(body.vector, np.float32), "vector") if body.vector is not None else None,
        point_id=body.point_id,
        target=body.target,
        limit=body.limit,
        filters=filters_from(body.filters),
    )


def result_to_grpc(result: SearchResult) -> pb.SearchResponse:
    """`SearchResponse` of a search's hits."""
    hits = []
    for hit in result.hits:
        f = hit_fields(hit)
        hits.append(
            pb.SearchHit(
                id=f["id"],
                score=f["score"],
                kind=f["kind"],
                key=f["key"],
                image_key=f["image_key"],
                caption=f["caption"],
                payload_json=payload_json(f["payload"]),
            )
        )
    return pb.SearchResponse(hits=hits, collection=result.collection, latency_ms=result.latency_ms)


def result_to_http(result: SearchResult) -> SearchOut:
    """The JSON body of a search's hits (with thumbnail URLs for hits that show an image)."""
    hits = []
    for hit in result.hits:
        f = hit_fields(hit)
        hits.append(
            HitOut(
                id=f["id"],
                score=f["score"],
                kind=f["kind"],
                key=f["key"],
                image_key=f["image_key"],
                caption=f["caption"],
                thumbnail=f"/v1/thumbnails/{hit.id}" if f["payload"].get("image_path") else None,
                payload=f["payload"],
            )
        )
    return SearchOut(hits=hits, target=result.target, collection=result.collection, latency_ms=result.latency_ms)


@dataclass(frozen=True)
class EmbedInputs:
    """What an embeddings request asks to embed: texts or images."""

    texts: list[str] | None = None
    """Texts, in order."""
    images: list[bytes] | None = None
    """Encoded image files, in order."""


def embed_inputs_from_http(body: EmbeddingsBody, bundle_version: str, dim: int) -> EmbedInputs:
    """The inputs of a `POST /v1/embeddings` body, checked against what is served.

    `dimensions` is refused unless it equals the served dimension: a shortened embedding is only meaningful for
    models trained for it (Matryoshka), which these bundles are not, so it is not honoured by truncation.

    Raises:
        InvalidInput: Another model, another dimension, mixed or malformed inputs, naming the field.
    """
    if body.model is not None and body.model != bundle_version:
        raise InvalidInput(f"model {body.model!r} is not served here (this is {bundle_version})")
    if body.dimensions is not None and body.dimensions != dim:
        raise InvalidInput(
            f"dimensions={body.dimensions} is not supported: the model {bundle_version} embeds in {dim} dimensions "
            "(omit dimensions or give that value)"
        )
    items: list[Any] = [body.input] if isinstance(body.input, str) else list(body.input)
    if items and all(isinstance(i, dict) for i in items):
        return EmbedInputs(images=[decode_base64(i.get("image", ""), f"input[{n}].image") for n, i in enumerate(items)])
    if all(isinstance(i, str) for i in items):
        return EmbedInputs(texts=items)
    raise InvalidInput("input items must be all strings or all {'image': base64} objects")


def embeddings_to_http(vectors: np.ndarray, tokens: int, bundle_version: str, encoding_format: str) -> dict[str, Any]:
    """The OpenAI-shaped body of embeddings (`float` lists or `base64` packed little-endian float32)."""
    data = []
    for n, v in enumerate(vectors):
        emb: Any = (
            base64.b64encode(v.astype(WIRE_DTYPE).tobytes()).decode() if encoding_format == "base64" else v.tolist()
        )
        data.append({"object": "embedding", "index": n, "embedding": emb})
    return {
        "object": "list",
        "data": data,
        "model": bundle_version,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
