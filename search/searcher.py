"""Search API: encode a query with one tower, ask the vector store for neighbours among one kind of points.

The collection contract on the read side: before the first query, and again whenever the name (an alias) points at
another collection, the searcher checks that the collection was written by the bundle that encodes the queries
(`store.identity`). The name is resolved on every query, so an alias switch (`imgtxt index --alias`) is followed
without a restart, and each collection's identity is checked once, when it is first searched. A collection holds
one bundle's vectors (writers refuse a second), so a result list never mixes two spaces.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from imgtxt.encoders.types import Encoder
from imgtxt.errors import InvalidInput
from store.base import DEFAULT_SEARCH, Hit, SearchOptions, VectorStore
from store.identity import check_identity
from store.ids import KINDS

logger = logging.getLogger(__name__)


class Searcher:
    """Text or image queries against one collection, or the collection an alias points at.

    Example:
        >>> searcher = Searcher(open_store(DEFAULT_STORE), BundleEncoder.from_bundle("bundle"), "my-bundle-v1")
        >>> [h.payload["image_path"] for h in searcher.search_text("a dog on a beach", target="image", limit=3)]

    Args:
        store: The vector store.
        encoder: Encodes queries; must be the bundle that wrote the collection (checked).
        collection: Collection name (the bundle version) or an alias of one (see `imgtxt index --alias`).

    Raises:
        KeyError: No such collection.
        BundleMismatch: Another bundle wrote it.
    """

    def __init__(self, store: VectorStore, encoder: Encoder, collection: str) -> None:
        self.store = store
        self.encoder = encoder
        self.name = collection
        """The name queries go to (an alias is resolved on every query)."""
        self._verified: set[str] = set()
        self._lock = threading.Lock()
        self.resolve()

    @property
    def collection(self) -> str:
        """The collection the name points at now."""
        return self.resolve()

    def resolve(self) -> str:
        """The collection the name points at now, after checking (once per collection) that the encoder's bundle
        wrote it.

        Raises:
            KeyError: The name points at no collection.
            BundleMismatch: Another bundle wrote the collection.
        """
        target = self.store.resolve(self.name)
        with self._lock:
            if target in self._verified:
                return target
        check_identity(target, self.store.collection_identity(target), self.encoder.identity, "search")
        with self._lock:
            if target not in self._verified:
                if self._verified:
                    logger.info("alias followed", extra={"alias": self.name, "collection": target})
                self._verified.add(target)
        return target

    def search_vectors(
        self,
        vectors: np.ndarray,
        target: str,
        limit: int = 10,
        filters: dict[str, Any] | None = None,
        options: SearchOptions = DEFAULT_SEARCH,
        collection: str | None = None,
    ) -> list[list[Hit]]:
        """Neighbours of each query vector among the `target` points (`image`, `text` or `unit`).

        Args:
            collection: The resolved collection to search (default: resolve the name now).
        """
        if target not in KINDS:
            raise InvalidInput(f"target must be one of {KINDS}, got {target!r}")
        name = collection or self.resolve()
        # Unit points also carry `image` and `text` vectors, so the kind filter keeps each target to its own points.
        return self.store.search(name, vectors, target, limit, {**(filters or {}), "kind": target}, options)

    def search_texts(self, texts: list[str], target: str = "image", limit: int = 10, **kw: Any) -> list[list[Hit]]:
        """Neighbours of each text query."""
        result = self.encoder.encode_texts(texts)
        bad = [o.message for o in result.outcomes if not o.ok]
        if bad:
            raise InvalidInput(f"query text rejected: {bad[0]}")
        return self.search_vectors(result.embeddings, target, limit, **kw)

    def search_text(self, text: str, target: str = "image", limit: int = 10, **kw: Any) -> list[Hit]:
        """Neighbours of one text query."""
        return self.search_texts([text], target, limit, **kw)[0]

    def search_image(self, image: bytes | str | Path, target: str = "text", limit: int = 10, **kw: Any) -> list[Hit]:
        """Neighbours of one image query (encoded bytes or a file path)."""
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        result = self.encoder.encode_images([data])
        if not result.outcomes[0].ok:
            raise InvalidInput(f"query image rejected: {result.outcomes[0].message}")
        return self.search_vectors(result.embeddings, target, limit, **kw)[0]
