"""Congruence of the two vector-store backends (embedded engine vs qdrant-client local mode), and retry rules."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from indexer.ids import point_id
from indexer.stores.base import CollectionConfig, DimensionMismatch, PointData, SearchOptions, VectorStore
from indexer.stores.factory import open_store
from indexer.stores.retry import call_with_retry, is_retryable

DIM = 16


def _scenario(store: VectorStore) -> dict[str, object]:
    """Creates, writes (twice: the second write overwrites), searches with and without filters, counts."""
    rng = np.random.default_rng(7)
    vecs = rng.normal(size=(40, DIM)).astype(np.float32)
    store.ensure_collection("congruence", CollectionConfig(dim=DIM))
    points = [
        PointData(
            point_id("image" if i % 2 else "text", f"k{i}"),
            {"image" if i % 2 else "text": vecs[i]},
            {"kind": "image" if i % 2 else "text", "key": f"k{i}", "group": i % 3},
        )
        for i in range(40)
    ]
    store.upsert(points[:25])
    store.upsert(points)  # overlaps the first write: same ids, so no duplicates
    store.flush()
    store.optimize()
    queries = rng.normal(size=(3, DIM)).astype(np.float32)
    exact = SearchOptions(exact=True)
    return {
        "count": store.count(),
        "count_images": store.count({"kind": "image"}),
        "image_hits": store.search(queries, "image", 5, {"kind": "image"}, exact),
        "filtered": store.search(queries, "text", 4, {"kind": "text", "group": 1}, exact),
        "dump": store.dump(),
    }


def test_embedded_engine_and_client_local_mode_agree(tmp_path: Path) -> None:
    edge, client = open_store(tmp_path / "edge"), open_store(":memory:")
    a, b = _scenario(edge), _scenario(client)
    assert a["count"] == b["count"] == 40 and a["count_images"] == b["count_images"] == 20
    for key in ("image_hits", "filtered"):
        for ha, hb in zip(a[key], b[key], strict=True):  # type: ignore[call-overload]
            assert [h.id for h in ha] == [h.id for h in hb] and len(ha) > 0
            np.testing.assert_allclose([h.score for h in ha], [h.score for h in hb], atol=1e-5)
            assert [h.payload for h in ha] == [h.payload for h in hb]
    assert all(h.payload["group"] == 1 for hits in a["filtered"] for h in hits)  # type: ignore[attr-defined]
    assert a["dump"].keys() == b["dump"].keys()  # type: ignore[attr-defined]
    edge.close()
    client.close()


@pytest.mark.parametrize("location", ["edge", ":memory:"])
def test_dimension_mismatch_names_both_dimensions(tmp_path: Path, location: str) -> None:
    store = open_store(tmp_path / "q" if location == "edge" else location)
    store.ensure_collection("c", CollectionConfig(dim=DIM))
    with pytest.raises(DimensionMismatch, match=f"dimension {DIM} but the bundle produces 32"):
        store.ensure_collection("c", CollectionConfig(dim=32))
    store.close()


def test_embedded_collection_persists_across_reopen(tmp_path: Path) -> None:
    store = open_store(tmp_path / "q")
    store.ensure_collection("c", CollectionConfig(dim=4))
    store.upsert([PointData(point_id("image", "a"), {"image": np.ones(4, np.float32)}, {"kind": "image"})])
    store.flush()
    store.close()
    again = open_store(tmp_path / "q")
    assert again.open_collection("c") == 4 and again.count() == 1
    with pytest.raises(KeyError):
        again.open_collection("other")
    again.close()


class _Rpc(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def test_retry_only_retryable_codes() -> None:
    calls: list[int] = []
    waits: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise _Rpc(grpc.StatusCode.UNAVAILABLE)
        return "ok"

    assert call_with_retry(flaky, attempts=5, sleep=waits.append) == "ok" and len(calls) == 3 and len(waits) == 2
    assert is_retryable(_Rpc(grpc.StatusCode.DEADLINE_EXCEEDED)) and is_retryable(
        _Rpc(grpc.StatusCode.RESOURCE_EXHAUSTED)
    )
    calls.clear()

    def broken() -> None:
        calls.append(1)
        raise _Rpc(grpc.StatusCode.INVALID_ARGUMENT)

    with pytest.raises(grpc.RpcError):
        call_with_retry(broken, attempts=5, sleep=waits.append)
    assert len(calls) == 1  # a bug is not retried

    def always_down() -> None:
        raise _Rpc(grpc.StatusCode.UNAVAILABLE)

    with pytest.raises(grpc.RpcError):
        call_with_retry(always_down, attempts=3, sleep=waits.append)
