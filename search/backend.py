"""The search service's domain object: one query in, ranked hits out, plus thumbnails and embeddings (no transport).

`imgtxt serve-search` puts gRPC (`search_service.servicer`) and HTTP (`search_service.http`) in front of one
`SearchBackend`; both call the same methods, so the two protocols cannot drift. A search is one nearest-neighbour
look-up: the query is encoded by one tower (or given as a vector, or taken from an indexed point) and the store
returns the neighbours among one kind of points.
"""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from imgtxt.encoders.types import Encoder, EncodeResult
from imgtxt.errors import InvalidInput, LimitExceeded
from search.searcher import Searcher
from store.base import Hit, PointData, SearchOptions, VectorStore
from store.ids import KINDS

THUMBNAIL_SIDE = 256
"""Longest side of a served thumbnail, in pixels."""


class NotFound(InvalidInput):
    """The request names a point (or a thumbnail) the collection does not hold."""


@dataclass(frozen=True)
class SearchLimits:
    """What one request may ask for; the encoder services' limits where the query is encoded."""

    max_limit: int = 100
    """Most hits per search."""
    max_text_chars: int = 2000
    """Longest text query, in characters (the text encoder's `max_text_chars`)."""
    max_image_bytes: int = 20 * 1024 * 1024
    """Largest image query, in bytes (the image encoder's `max_image_bytes`)."""
    max_batch: int = 64
    """Most inputs of one embeddings request."""


@dataclass(frozen=True)
class Query:
    """One search: exactly one of `text`, `image`, `vector`, `point_id`."""

    text: str | None = None
    """A text query."""
    image: bytes | None = None
    """Encoded image file bytes."""
    vector: np.ndarray | None = None
    """A vector of the collection's space."""
    point_id: str | None = None
    """"More like this": an indexed point, whose image (or caption) is the query."""
    target: str | None = None
    """Kind of points to search (default: image for text and text for image queries)."""
    limit: int = 10
    """Most hits."""
    filters: dict[str, Any] = field(default_factory=dict)
    """Payload equality filters."""


@dataclass(frozen=True)
class SearchResult:
    """The hits of one search, best first, and how long it took."""

    hits: list[Hit]
    """Best first."""
    target: str
    """The kind searched."""
    collection: str
    """The collection searched (where the name is an alias, the one it pointed at for this search)."""
    latency_ms: float
    """Encode + look-up, measured here."""


def hit_fields(hit: Hit) -> dict[str, Any]:
    """The fields every client shows: id, score, kind, key, image key, caption, and the payload."""
    p = hit.payload
    kind = str(p.get("kind", ""))
    image_key = str(p.get("image_key") or (p.get("key") if kind == "image" else "") or "")
    return {
        "id": hit.id,
        "score": hit.score,
        "kind": kind,
        "key": str(p.get("key", "")),
        "image_key": image_key,
        "caption": str(p.get("text", "")),
        "payload": p,
    }


class SearchBackend:
    """Searches one collection with one encoder; thread-safe (the store and the encoders are).

    Args:
        store: The vector store.
        encoder: Encodes queries (the bundle the collection was indexed with).
        collection: Collection name or alias.
        limits: Per-request limits.
        options: Search parameters (HNSW ef, exact, rescoring).
    """

    def __init__(
        self,
        store: VectorStore,
        encoder: Encoder,
        collection: str,
        limits: SearchLimits | None = None,
        options: SearchOptions | None = None,
    ) -> None:
        self.searcher = Searcher(store, encoder, collection)
        self.store = store
        self.encoder = encoder
        self.limits = limits or SearchLimits()
        self.options = options or SearchOptions()
        self._thumbs: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def collection(self) -> str:
        """The collection searched now (an alias is followed: see `Searcher.resolve`)."""
        return self.searcher.resolve()

    def info(self) -> dict[str, Any]:
        """Collection, bundle, dimension, points per kind and limits."""
        collection = self.searcher.resolve()
        return {
            "collection": collection,
            "bundle_version": self.encoder.bundle_version,
            "dim": self.encoder.dim,
            "points": {k: self.store.count(collection, {"kind": k}) for k in KINDS},
            "max_limit": self.limits.max_limit,
            "max_text_chars": self.limits.max_text_chars,
            "max_image_bytes": self.limits.max_image_bytes,
        }

    def _check(self, query: Query) -> None:
        given = [name for name in ("text", "image", "vector", "point_id") if getattr(query, name) is not None]
        if len(given) != 1:
            raise InvalidInput(f"give exactly one of text, image, vector, point_id (got {', '.join(given) or 'none'})")
        if not 1 <= query.limit <= self.limits.max_limit:
            raise InvalidInput(f"limit must be in 1..{self.limits.max_limit}, got {query.limit}")
        if query.target is not None and query.target not in KINDS:
            raise InvalidInput(f"target must be one of {KINDS}, got {query.target!r}")
        if query.text is not None:
            if not query.text.strip():
                raise InvalidInput("text query is empty")
            if len(query.text) > self.limits.max_text_chars:
                raise LimitExceeded(
                    f"text query has {len(query.text)} characters, over the limit max_text_chars="
                    f"{self.limits.max_text_chars}"
                )
        if query.image is not None and len(query.image) > self.limits.max_image_bytes:
            raise LimitExceeded(
                f"image query has {len(query.image)} bytes, over the limit "
                f"max_image_bytes={self.limits.max_image_bytes}"
            )
        if query.vector is not None and query.vector.shape != (self.encoder.dim,):
            raise InvalidInput(f"vector must have dimension {self.encoder.dim}, got shape {query.vector.shape}")

    def _encoded(self, result: EncodeResult, what: str) -> np.ndarray:
        if not result.outcomes[0].ok:
            raise InvalidInput(f"{what} query rejected: {result.outcomes[0].message.removeprefix('item 0: ')}")
        return result.embeddings

    def _point(self, point_id: str, collection: str, with_vectors: bool = False) -> PointData:
        try:
            point_id = str(uuid.UUID(point_id))
        except ValueError:
            raise NotFound(f"point {point_id!r} is not in collection {collection!r} (ids are UUIDs)") from None
        point = self.store.retrieve(collection, [point_id], with_vectors).get(point_id)
        if point is None:
            raise NotFound(f"point {point_id!r} is not in collection {collection!r}")
        return point

    def search(self, query: Query) -> SearchResult:
        """Runs one search.

        Raises:
            InvalidInput: A malformed query (naming the field), or a point id the collection does not hold.
            LimitExceeded: A query over a limit (naming it).
        """
        self._check(query)
        start = time.perf_counter()
        collection = self.searcher.resolve()  # once per search: the hits and the point come from one collection
        if query.text is not None:
            target = query.target or "image"
            vectors = self._encoded(self.encoder.encode_texts([query.text]), "text")
        elif query.image is not None:
            target = query.target or "text"
            vectors = self._encoded(self.encoder.encode_images([query.image]), "image")
        elif query.vector is not None:
            target = query.target or "image"
            vectors = np.asarray(query.vector, np.float32)[None]
        else:
            assert query.point_id is not None
            # "More like this": the point's own stored vector is the query (no file is read, nothing re-encoded).
            point = self._point(query.point_id, collection, with_vectors=True)
            kind = str(point.payload.get("kind", ""))
            if kind not in point.vectors:
                raise NotFound(f"point {query.point_id!r} of collection {collection!r} has no {kind or 'own'} vector")
            target = query.target or kind
            vectors = np.asarray(point.vectors[kind], np.float32)[None]
        (hits,) = self.searcher.search_vectors(
            vectors, target, query.limit, query.filters, self.options, collection=collection
        )
        return SearchResult(hits, target, collection, (time.perf_counter() - start) * 1000)

    def thumbnail(self, point_id: str) -> bytes:
        """A JPEG of at most `THUMBNAIL_SIDE` pixels of the image of an indexed point.

        Only images the collection indexed are served: the path comes from the point's payload, never from the
        request, so no other file can be read.

        Raises:
            NotFound: No such point, or a point without an image.
        """
        with self._lock:
            if point_id in self._thumbs:
                self._thumbs.move_to_end(point_id)
                return self._thumbs[point_id]
        path = self._point(point_id, self.searcher.resolve()).payload.get("image_path")
        if not path:
            raise NotFound(f"point {point_id!r} has no image")
        try:
            with Image.open(path) as img:
                img.draft("RGB", (THUMBNAIL_SIDE, THUMBNAIL_SIDE))  # JPEG: decode at a reduced scale
                rgb = img.convert("RGB")
                rgb.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
                buf = io.BytesIO()
                rgb.save(buf, "JPEG", quality=85)
        except OSError as exc:
            raise NotFound(f"the image of point {point_id!r} cannot be read ({type(exc).__name__})") from exc
        data = buf.getvalue()
        with self._lock:
            self._thumbs[point_id] = data
            while len(self._thumbs) > 512:
                self._thumbs.popitem(last=False)
        return data

    def embed(self, texts: list[str] | None = None, images: list[bytes] | None = None) -> tuple[np.ndarray, int]:
        """Embeddings of texts or images (the OpenAI-style embeddings route), and the tokens the texts took.

        Raises:
            InvalidInput: Neither or both given, too many inputs, or an input that fails (naming its index).
        """
        if (texts is None) == (images is None):
            raise InvalidInput("give texts or images")
        items: list[Any] = texts if texts is not None else images  # type: ignore[assignment]
        if not items or len(items) > self.limits.max_batch:
            raise InvalidInput(f"input must hold 1..{self.limits.max_batch} items, got {len(items)}")
        result = self.encoder.encode_texts(items) if texts is not None else self.encoder.encode_images(items)
        bad = [(i, o.message) for i, o in enumerate(result.outcomes) if not o.ok]
        if bad:
            i, message = bad[0]
            raise InvalidInput(f"input[{i}] rejected: {message.removeprefix(f'item {i}: ')}")
        return result.embeddings, sum(o.num_tokens for o in result.outcomes)


def payload_json(payload: dict[str, Any]) -> str:
    """A payload as a compact JSON object."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))
