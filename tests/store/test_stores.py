"""Congruence of the two vector-store backends (embedded engine vs qdrant-client local mode), and retry rules."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from qdrant_client import models

from store.base import (
    CollectionConfig,
    CollectionMismatch,
    DimensionMismatch,
    PointData,
    SearchOptions,
    VectorStore,
)
from store.client import ClientStore, config_from_info
from store.factory import open_store
from store.ids import point_id
from store.retry import call_with_retry, is_retryable

DIM = 16
BACKENDS = ["edge", ":memory:"]


def _open(tmp_path: Path, location: str) -> VectorStore:
    return open_store(tmp_path / "q" if location == "edge" else location)


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


@pytest.mark.parametrize("location", BACKENDS)
def test_dimension_mismatch_names_both_dimensions(tmp_path: Path, location: str) -> None:
    store = _open(tmp_path, location)
    store.ensure_collection("c", CollectionConfig(dim=DIM))
    with pytest.raises(DimensionMismatch, match=f"dimension {DIM} but the bundle produces 32"):
        store.ensure_collection("c", CollectionConfig(dim=32))
    store.close()


def _reopen_scenario(store: VectorStore) -> dict[str, object]:
    """Creates a collection, reopens it as requested and with each checked option changed; records the outcomes."""
    created = CollectionConfig(dim=DIM, hnsw_m=8, hnsw_ef_construct=40, full_scan_threshold=500, quantization="int8")
    out: dict[str, object] = {
        "first": store.ensure_collection("c", created),
        "again": store.ensure_collection("c", created),
    }
    out["stored"] = store.collection_config("c")
    changes = {
        "quantization": "none",
        "hnsw_m": 16,
        "hnsw_ef_construct": 100,
        "full_scan_threshold": 10_000,
        "on_disk": True,
    }
    for name, value in changes.items():
        try:
            store.ensure_collection("c", dataclasses.replace(created, **{name: value}))
            out[name] = "accepted"
        except CollectionMismatch as exc:
            out[name] = str(exc)
    return out


def test_reopening_with_other_options_is_refused_on_both_backends(tmp_path: Path) -> None:
    edge, client = open_store(tmp_path / "edge"), open_store(":memory:")
    a, b = _reopen_scenario(edge), _reopen_scenario(client)
    edge.close()
    client.close()
    assert a["first"] is b["first"] is True and a["again"] is b["again"] is False
    assert a["stored"] == b["stored"]
    stored = a["stored"]
    assert isinstance(stored, CollectionConfig)
    assert (stored.quantization, stored.hnsw_m, stored.hnsw_ef_construct, stored.full_scan_threshold) == (
        "int8",
        8,
        40,
        500,
    )
    # Each change is refused, naming the option, the collection's value, the requested one and the flag.
    expected = {
        "quantization": "quantization 'int8', not the requested 'none' (--quantization)",
        "hnsw_m": "hnsw_m 8, not the requested 16 (--hnsw-m)",
        "hnsw_ef_construct": "hnsw_ef_construct 40, not the requested 100 (--hnsw-ef-construct)",
        "full_scan_threshold": "full_scan_threshold 500, not the requested 10000 (--full-scan-threshold-kb)",
        "on_disk": "on_disk False, not the requested True (--on-disk)",
    }
    for name, fragment in expected.items():
        assert fragment in str(a[name]) and fragment in str(b[name]), name
        assert "--recreate" in str(a[name])


def test_local_mode_records_the_creation_config_and_servers_report_their_own(tmp_path: Path) -> None:
    store = ClientStore(f"local:{tmp_path / 'local'}")
    config = CollectionConfig(
        dim=DIM, quantization="binary", shard_number=3, replication_factor=2, write_consistency_factor=2
    )
    store.ensure_collection("c", config)
    store.close()
    again = ClientStore(f"local:{tmp_path / 'local'}")  # persisted with the collection, read back after reopening
    assert again.collection_config("c") == config
    # A server's live configuration (here: local mode's answer, with a server's settings filled in) is read as such.
    info = again.client.get_collection("c")
    served = info.model_copy(
        update={
            "config": info.config.model_copy(
                update={
                    "hnsw_config": info.config.hnsw_config.model_copy(update={"m": 32, "full_scan_threshold": 77}),
                    "quantization_config": models.ScalarQuantization(
                        scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8)
                    ),
                    "params": info.config.params.model_copy(update={"shard_number": 4}),
                }
            )
        }
    )
    live = config_from_info(served)
    assert (live.dim, live.hnsw_m, live.full_scan_threshold, live.quantization, live.shard_number) == (
        DIM,
        32,
        77,
        "int8",
        4,
    )
    again.close()


def test_embedded_engine_refuses_server_only_options(tmp_path: Path) -> None:
    store = open_store(tmp_path / "q")
    for option, flag in (("shard_number", "--shards 2"), ("replication_factor", "--replication-factor 2")):
        with pytest.raises(ValueError, match=f"one shard with no replicas, so {flag} cannot apply"):
            store.ensure_collection("c", CollectionConfig(dim=DIM, **{option: 2}))
    assert not (tmp_path / "q" / "c").exists()  # refused before anything was created
    store.ensure_collection("c", CollectionConfig(dim=DIM, shard_number=1))  # one shard is what it has
    store.close()


def _alias_scenario(store: VectorStore) -> dict[str, object]:
    """Two collections (old and new bundle), an alias switched from one to the other, then the old one deleted."""
    out: dict[str, object] = {}
    for name, vec in (("v1", [1.0, 0.0]), ("v2", [0.0, 1.0])):
        store.ensure_collection(name, CollectionConfig(dim=2))
        store.upsert([PointData(point_id("image", name), {"image": np.array(vec, np.float32)}, {"kind": "image"})])
        store.flush()
    store.set_alias("live", "v1")
    out["v1"] = (
        store.resolve("live"),
        store.open_collection("live"),
        [h.payload for h in store.search(np.array([1.0, 0.0]), "image", 1)[0]],
    )
    store.set_alias("live", "v2")  # one step: searches through `live` now see v2
    store.open_collection("live")
    hits = store.search(np.array([1.0, 0.0]), "image", 1)[0]
    out["v2"] = (store.resolve("live"), [h.id for h in hits])
    store.ensure_collection("live", CollectionConfig(dim=2))  # writing through the alias writes into v2
    out["resolve_plain"] = store.resolve("v1")
    with pytest.raises(ValueError, match="alias cannot have a collection's name"):
        store.set_alias("v1", "v2")
    with pytest.raises(KeyError):
        store.set_alias("other", "nope")
    store.delete_collection("v2")  # deleting a collection removes the aliases pointing at it
    out["after_delete"] = store.resolve("live")
    with pytest.raises(KeyError):
        store.open_collection("live")
    return out


def test_aliases_switch_in_one_step_on_both_backends(tmp_path: Path) -> None:
    edge, client = open_store(tmp_path / "edge"), open_store(":memory:")
    a, b = _alias_scenario(edge), _alias_scenario(client)
    edge.close()
    client.close()
    assert a == b
    assert a["v1"] == ("v1", 2, [{"kind": "image"}])
    assert a["v2"] == ("v2", [point_id("image", "v2")])
    assert a["resolve_plain"] == "v1" and a["after_delete"] == "live"
    # The embedded engine has no aliases: the store keeps them in one small file, replaced atomically.
    assert json.loads((tmp_path / "edge" / "imgtxt_aliases.json").read_text()) == {}


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
