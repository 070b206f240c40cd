"""A search service over a real embedded Qdrant index of a tiny dataset, encoding through real encoder services."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imgtxt.client import ServiceEncoder
from imgtxt.encoders.bundle import BundleEncoder
from imgtxt.encoders.unit import UnitEncoder
from indexer.pipeline import IndexConfig, run_index
from indexer.reader import read_records
from search.backend import SearchBackend, SearchLimits
from search_service.server import SearchServer, SearchServerConfig, create_search_server
from store.base import CollectionConfig
from store.factory import open_store
from tests.conftest import make_dataset

TOKEN = "s3arch-t0ken"


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory, encoder: BundleEncoder, tiny_bundle: Path) -> tuple[Path, Path]:
    """12 images x 2 captions indexed as image, text and unit points; returns (dataset, store directory)."""
    root = tmp_path_factory.mktemp("search")
    data = make_dataset(root / "data", 12, captions=2)
    store = open_store(root / "qdrant")
    try:
        run_index(
            read_records(data, split="val"),
            encoder,
            store,
            "search-test",
            CollectionConfig(dim=encoder.dim),
            IndexConfig(progress=False),
            fusion=UnitEncoder(encoder.bundle),
        )
    finally:
        store.close()
    return data, root / "qdrant"


def _serve(
    index: tuple[Path, Path], services: tuple[str, str], token: str | None, **config: Any
) -> Iterator[SearchServer]:
    store = open_store(index[1])
    encoder = ServiceEncoder(*services)
    backend = SearchBackend(store, encoder, "search-test", SearchLimits(max_limit=20, max_text_chars=200))
    server = create_search_server(SearchServerConfig(port=0, http_port=0, auth_token=token, **config), backend)
    try:
        yield server
    finally:
        server.stop(grace=0)
        encoder.close()
        store.close()


@pytest.fixture(scope="module")
def search_server(index: tuple[Path, Path], encoder_services: tuple[str, str]) -> Iterator[SearchServer]:
    """The search service without auth."""
    yield from _serve(index, encoder_services, None)


@pytest.fixture(scope="module")
def secured_search_server(index: tuple[Path, Path], encoder_services: tuple[str, str]) -> Iterator[SearchServer]:
    """The search service requiring a bearer token on both protocols."""
    yield from _serve(index, encoder_services, TOKEN)
