"""Search API: encode a query with one tower, ask the vector store for neighbours among one kind of points."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from imgtxt.encoders.types import Encoder
from imgtxt.errors import InvalidInput
from store.base import DEFAULT_SEARCH, Hit, SearchOptions, VectorStore
from store.ids import KINDS


class Searcher:
    """Text or image queries against one collection.

    Example:
        >>> searcher = Searcher(open_store(DEFAULT_STORE), BundleEncoder.from_bundle("bundle"), "my-bundle-v1")
        >>> [h.payload["image_path"] for h in searcher.search_text("a dog on a beach", target="image", limit=3)]

    Args:
        store: The vector store (its collection is opened here).
        encoder: Encodes queries; must be the bundle the collection was indexed with.
        collection: Collection name (the bundle version) or an alias of it (see `imgtxt index --alias`).
    """

    def __init__(self, store: VectorStore, encoder: Encoder, collection: str) -> None:
        dim = store.open_collection(collection)
        self.collection = store.resolve(collection)
        """The collection searched (the target of `collection` when that is an alias)."""
        if dim != encoder.dim:
            raise InvalidInput(
                f"collection {self.collection!r} has dimension {dim}, the encoder produces {encoder.dim}"
            )
        self.store = store
        self.encoder = encoder

    def _checked(self, results: list[list[Hit]]) -> list[list[Hit]]:
        """Refuses results indexed by another bundle than the one encoding the queries (their spaces differ)."""
        for hits in results:
            for h in hits[:1]:
                indexed = h.payload.get("bundle_version")
                if indexed is not None and indexed != self.encoder.bundle_version:
                    raise InvalidInput(
                        f"collection {self.collection!r} was indexed with bundle {indexed}, but the queries are "
                        f"encoded by {self.encoder.bundle_version}: serve that bundle, or search another collection"
                    )
        return results

    def search_vectors(
        self,
        vectors: np.ndarray,
        target: str,
        limit: int = 10,
        filters: dict[str, Any] | None = None,
        options: SearchOptions = DEFAULT_SEARCH,
    ) -> list[list[Hit]]:
        """Neighbours of each query vector among the `target` points (`image`, `text` or `unit`)."""
        if target not in KINDS:
            raise InvalidInput(f"target must be one of {KINDS}, got {target!r}")
        # Unit points also carry `image` and `text` vectors, so the kind filter keeps each target to its own points.
        return self.store.search(vectors, target, limit, {**(filters or {}), "kind": target}, options)

    def search_texts(self, texts: list[str], target: str = "image", limit: int = 10, **kw: Any) -> list[list[Hit]]:
        """Neighbours of each text query."""
        result = self.encoder.encode_texts(texts)
        bad = [o.message for o in result.outcomes if not o.ok]
        if bad:
            raise InvalidInput(f"query text rejected: {bad[0]}")
        return self._checked(self.search_vectors(result.embeddings, target, limit, **kw))

    def search_text(self, text: str, target: str = "image", limit: int = 10, **kw: Any) -> list[Hit]:
        """Neighbours of one text query."""
        return self.search_texts([text], target, limit, **kw)[0]

    def search_image(self, image: bytes | str | Path, target: str = "text", limit: int = 10, **kw: Any) -> list[Hit]:
        """Neighbours of one image query (encoded bytes or a file path)."""
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        result = self.encoder.encode_images([data])
        if not result.outcomes[0].ok:
            raise InvalidInput(f"query image rejected: {result.outcomes[0].message}")
        return self._checked(self.search_vectors(result.embeddings, target, limit, **kw))[0]
