"""Opening a vector store by location: a directory is the embedded engine, a URL a Qdrant server."""

from __future__ import annotations

from pathlib import Path

from store.base import VectorStore

URL_SCHEMES = ("qdrant://", "http://", "https://")


def is_url(location: str) -> bool:
    """Whether a store location names a Qdrant server (`qdrant://`, `http://`, `https://`)."""
    return location.startswith(URL_SCHEMES)


def open_store(
    location: str | Path, api_key: str | None = None, timeout: float = 30.0, retries: int = 5
) -> VectorStore:
    """Opens a store by location.

    Args:
        location: A directory (embedded Qdrant engine, the default), `qdrant://host:port` (gRPC) or `http(s)://...`
            (a Qdrant server or cluster), `:memory:` or `local:PATH` (qdrant-client's pure-Python local mode).
        api_key: API key of a Qdrant server.
        timeout: Per-request timeout of a Qdrant server, in seconds.
        retries: Attempts on retryable server errors (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED).
    """
    loc = str(location)
    if is_url(loc) or loc == ":memory:" or loc.startswith("local:"):
        from store.client import ClientStore

        return ClientStore(loc, api_key=api_key, timeout=timeout, retries=retries)
    from store.edge import EdgeStore

    return EdgeStore(Path(loc))
