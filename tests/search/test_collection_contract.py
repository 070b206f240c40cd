"""The reader's side of the collection contract, against a running search service (gRPC and HTTP).

A collection belongs to the bundle that wrote it. The service resolves its collection name on every query, so an
alias switch is followed without a restart; a collection another bundle wrote is refused by name, never answered.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from imgtxt.encoders.bundle import BundleEncoder
from imgtxt.encoders.session import SessionConfig
from imgtxt.v1 import search_pb2 as pb
from imgtxt.v1 import search_pb2_grpc as pb_grpc
from indexer import IndexConfig, read_records, run_index
from search.backend import SearchBackend
from search_service.server import SearchServer, SearchServerConfig, create_search_server
from store.base import CollectionConfig
from store.factory import open_store
from store.ids import point_id
from tests.conftest import make_dataset
from tests.indexer.bundles import bundle_variant


@pytest.fixture(scope="module")
def other_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny towers released as another bundle version (another identity)."""
    return bundle_variant(tiny_bundle, tmp_path_factory.mktemp("b") / "other", "tiny-other")


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory, encoder: BundleEncoder, other_bundle: Path) -> Path:
    """Collections `a` (4 images) and `b` (6 images) by the tiny bundle, `c` by another bundle; alias `live` -> a."""
    root = tmp_path_factory.mktemp("contract")
    store = open_store(root / "q")
    other = BundleEncoder.from_bundle(other_bundle, SessionConfig(device="cpu", intra_op_threads=1))
    try:
        for name, n, enc in (("a", 4, encoder), ("b", 6, encoder), ("c", 3, other)):
            data = make_dataset(root / name, n, captions=1, seed=len(name) + n)
            run_index(
                read_records(data, split="val"),
                enc,
                store,
                name,
                CollectionConfig(dim=enc.dim),
                IndexConfig(kinds=("image", "text"), progress=False),
            )
        store.set_alias("live", "a")
    finally:
        store.close()
        other.close()
    return root / "q"


@pytest.fixture()
def server(store_root: Path, encoder: BundleEncoder) -> Iterator[SearchServer]:
    store = open_store(store_root)
    open_store(store_root).set_alias("live", "a")  # each test starts from live -> a
    srv = create_search_server(SearchServerConfig(port=0, http_port=0), SearchBackend(store, encoder, "live"))
    try:
        yield srv
    finally:
        srv.stop(grace=0)
        store.close()


def _search(srv: SearchServer, **request: object) -> pb.SearchResponse:
    stub = pb_grpc.SearchServiceStub(grpc.insecure_channel(f"127.0.0.1:{srv.port}"))
    return stub.Search(pb.SearchRequest(**request), timeout=30)  # type: ignore[arg-type]


def _http_search(srv: SearchServer, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{srv.http_port}/v1/search",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_a_running_service_follows_an_alias_switch_and_refuses_another_bundles_collection(
    server: SearchServer, store_root: Path
) -> None:
    first = _search(server, text="photo 1 shows thing 0", target="image", limit=10)
    assert first.collection == "a" and len(first.hits) == 4
    # Another process (an indexing job's --alias) moves the alias: the next query, on the same running service,
    # is answered from the new collection, with no restart.
    open_store(store_root).set_alias("live", "b")
    second = _search(server, text="photo 1 shows thing 0", target="image", limit=10)
    assert second.collection == "b" and len(second.hits) == 6
    status, body = _http_search(server, {"text": "photo 1 shows thing 0", "target": "image", "limit": 10})
    assert status == 200 and body["collection"] == "b" and len(body["hits"]) == 6  # type: ignore[arg-type]
    # Moved to a collection another bundle wrote: refused by name on both protocols, never answered from it.
    open_store(store_root).set_alias("live", "c")
    with pytest.raises(grpc.RpcError) as err:
        _search(server, text="photo 1 shows thing 0", target="image", limit=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "collection 'c' belongs to bundle tiny-other" in err.value.details()
    assert "the search uses bundle tiny-d32-s0" in err.value.details()
    status, body = _http_search(server, {"text": "photo 1 shows thing 0", "target": "image", "limit": 10})
    assert status == 409 and "belongs to bundle tiny-other" in json.dumps(body)
    # And back: the service answers again, from the collection the alias names now.
    open_store(store_root).set_alias("live", "a")
    assert _search(server, text="photo 1 shows thing 0", target="image", limit=10).collection == "a"


def test_more_like_this_uses_the_points_stored_vector_not_its_file(tmp_path: Path, encoder: BundleEncoder) -> None:
    data = make_dataset(tmp_path / "data", 5, captions=1)
    store = open_store(tmp_path / "q")
    run_index(
        read_records(data, split="val"),
        encoder,
        store,
        "m",
        CollectionConfig(dim=encoder.dim),
        IndexConfig(kinds=("image", "text"), progress=False),
    )
    srv = create_search_server(SearchServerConfig(port=0, http_port=0), SearchBackend(store, encoder, "m"))
    try:
        gone = data / "images" / "img0002.jpg"
        gone.unlink()  # the indexed image's file is deleted after indexing
        own = point_id("image", "img0002.jpg")
        assert own in store.retrieve("m", [own])
        hits = _search(srv, point_id=own, target="image", limit=3).hits  # was: INTERNAL (FileNotFoundError)
        assert hits[0].id == own and hits[0].score == pytest.approx(1.0, abs=1e-4)
        status, body = _http_search(srv, {"point_id": own, "target": "image", "limit": 3})
        assert status == 200 and body["hits"][0]["id"] == own  # type: ignore[index]
        # A caption's point is its own query too (its text vector, not re-encoded text).
        caption = point_id("text", "img0001.jpg#0")
        assert _search(srv, point_id=caption, target="text", limit=1).hits[0].id == caption
    finally:
        srv.stop(grace=0)
        store.close()


def test_serve_search_refuses_another_bundles_collection_before_serving(
    store_root: Path, tiny_bundle: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    from search_service.__main__ import main as serve_main

    argv = ["--bundle", str(tiny_bundle), "--in-process", "--device", "cpu", "--store", str(store_root)]
    assert serve_main([*argv, "--collection", "c", "--port", "0", "--http-port", "0"]) == 2
    err = capsys.readouterr().err
    assert "collection 'c' belongs to bundle tiny-other" in err and "the search uses bundle tiny-d32-s0" in err
