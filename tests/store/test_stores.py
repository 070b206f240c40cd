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
from store.identity import BundleMismatch
from store.ids import point_id
from store.retry import call_with_retry, is_retryable
from tests.store.identities import identity

DIM = 16
BACKENDS = ["edge", ":memory:"]
BUNDLE = identity("b1", DIM)


def _open(tmp_path: Path, location: str) -> VectorStore:
    return open_store(tmp_path / "q" if location == "edge" else location)


def _scenario(store: VectorStore) -> dict[str, object]:
    """Creates, writes (twice: the second write overwrites), searches with and without filters, counts."""
    rng = np.random.default_rng(7)
    vecs = rng.normal(size=(40, DIM)).astype(np.float32)
    store.ensure_collection("congruence", CollectionConfig(dim=DIM), BUNDLE)
    points = [
        PointData(
            point_id("image" if i % 2 else "text", f"k{i}"),
            {"image" if i % 2 else "text": vecs[i]},
            {"kind": "image" if i % 2 else "text", "key": f"k{i}", "group": i % 3},
        )
        for i in range(40)
    ]
    store.upsert("congruence", points[:25])
    store.upsert("congruence", points)  # overlaps the first write: same ids, so no duplicates
    store.flush("congruence")
    store.optimize("congruence")
    queries = rng.normal(size=(3, DIM)).astype(np.float32)
    exact = SearchOptions(exact=True)
    return {
        "count": store.count("congruence"),
        "count_images": store.count("congruence", {"kind": "image"}),
        "image_hits": store.search("congruence", queries, "image", 5, {"kind": "image"}, exact),
        "filtered": store.search("congruence", queries, "text", 4, {"kind": "text", "group": 1}, exact),
        "dump": store.dump("congruence"),
        "retrieved": store.retrieve("congruence", [points[1].id, point_id("image", "absent")], with_vectors=True),
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
    for got in (a["retrieved"], b["retrieved"]):  # only the existing point, with its stored vector
        assert list(got) == [point_id("image", "k1")]  # type: ignore[call-overload]
        np.testing.assert_allclose(
            got[point_id("image", "k1")].vectors["image"], a["dump"][point_id("image", "k1")][1]["image"]
        )  # type: ignore[index]
    edge.close()
    client.close()


@pytest.mark.parametrize("location", BACKENDS)
def test_dimension_mismatch_names_both_dimensions(tmp_path: Path, location: str) -> None:
    store = _open(tmp_path, location)
    store.ensure_collection("c", CollectionConfig(dim=DIM), BUNDLE)
    with pytest.raises(DimensionMismatch, match=f"dimension {DIM} but the bundle produces 32"):
        store.ensure_collection("c", CollectionConfig(dim=32), identity("b2", 32))
    store.close()


def _reopen_scenario(store: VectorStore) -> dict[str, object]:
    """Creates a collection, reopens it as requested and with each checked option changed; records the outcomes."""
    created = CollectionConfig(dim=DIM, hnsw_m=8, hnsw_ef_construct=40, full_scan_threshold=500, quantization="int8")
    out: dict[str, object] = {
        "first": store.ensure_collection("c", created, BUNDLE),
        "again": store.ensure_collection("c", created, BUNDLE),
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
            store.ensure_collection("c", dataclasses.replace(created, **{name: value}), BUNDLE)
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
    store.ensure_collection("c", config, BUNDLE)
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
            store.ensure_collection("c", CollectionConfig(dim=DIM, **{option: 2}), BUNDLE)
    assert not (tmp_path / "q" / "c").exists()  # refused before anything was created
    store.ensure_collection("c", CollectionConfig(dim=DIM, shard_number=1), BUNDLE)  # one shard is what it has
    store.close()


def _alias_scenario(store: VectorStore) -> dict[str, object]:
    """Two collections (old and new bundle), an alias switched from one to the other, then the old one deleted."""
    out: dict[str, object] = {}
    for name, vec in (("v1", [1.0, 0.0]), ("v2", [0.0, 1.0])):
        store.ensure_collection(name, CollectionConfig(dim=2), identity(name, 2))
        point = PointData(point_id("image", name), {"image": np.array(vec, np.float32)}, {"kind": "image"})
        store.upsert(name, [point])
        store.flush(name)
    store.set_alias("live", "v1")
    out["v1"] = (
        store.resolve("live"),
        store.collection_config("live").dim,
        [h.payload for h in store.search("live", np.array([1.0, 0.0]), "image", 1)[0]],
        store.aliases_of("v1"),
    )
    store.set_alias("live", "v2")  # one step: searches through `live` now see v2
    hits = store.search("live", np.array([1.0, 0.0]), "image", 1)[0]
    out["v2"] = (store.resolve("live"), [h.id for h in hits], store.aliases_of("v1"), store.aliases_of("v2"))
    # Writing through the alias writes into v2, for v2's bundle only.
    store.ensure_collection("live", CollectionConfig(dim=2), identity("v2", 2))
    with pytest.raises(BundleMismatch, match=r"collection .v2. belongs to bundle v2 .* the write uses bundle v1"):
        store.ensure_collection("live", CollectionConfig(dim=2), identity("v1", 2))
    out["resolve_plain"] = store.resolve("v1")
    with pytest.raises(ValueError, match="alias cannot have a collection's name"):
        store.set_alias("v1", "v2")
    with pytest.raises(KeyError):
        store.set_alias("other", "nope")
    store.delete_collection("v2")  # deleting a collection removes the aliases pointing at it
    out["after_delete"] = store.resolve("live")
    with pytest.raises(KeyError):
        store.collection_config("live")
    return out


def test_aliases_switch_in_one_step_on_both_backends(tmp_path: Path) -> None:
    edge, client = open_store(tmp_path / "edge"), open_store(":memory:")
    a, b = _alias_scenario(edge), _alias_scenario(client)
    edge.close()
    client.close()
    assert a == b
    assert a["v1"] == ("v1", 2, [{"kind": "image"}], ["live"])
    assert a["v2"] == ("v2", [point_id("image", "v2")], [], ["live"])
    assert a["resolve_plain"] == "v1" and a["after_delete"] == "live"
    # The embedded engine has no aliases: the store keeps them in one small file, replaced atomically.
    assert json.loads((tmp_path / "edge" / "imgtxt_aliases.json").read_text()) == {}


def test_embedded_collection_persists_across_reopen(tmp_path: Path) -> None:
    store = open_store(tmp_path / "q")
    store.ensure_collection("c", CollectionConfig(dim=4), identity("b1", 4))
    store.upsert("c", [PointData(point_id("image", "a"), {"image": np.ones(4, np.float32)}, {"kind": "image"})])
    store.flush("c")
    store.close()
    again = open_store(tmp_path / "q")
    assert again.collection_config("c").dim == 4 and again.count("c") == 1
    assert again.collection_identity("c") == identity("b1", 4)
    with pytest.raises(KeyError):
        again.count("other")
    again.close()


def _identity_scenario(store: VectorStore) -> dict[str, object]:
    """A collection created by one bundle: the identity it records, and what a second bundle's writer gets."""
    store.ensure_collection("c", CollectionConfig(dim=DIM), BUNDLE)
    out: dict[str, object] = {"recorded": store.collection_identity("c")}
    for name, other in (
        ("same_dim", identity("b2", DIM)),
        ("same_version", dataclasses.replace(BUNDLE, sha256="f" * 64)),
    ):
        try:
            store.ensure_collection("c", CollectionConfig(dim=DIM), other)
            out[name] = "accepted"
        except BundleMismatch as exc:
            out[name] = str(exc)
    # A second bundle is refused even when it asks for other options too: the bundle is named, not the option.
    try:
        store.ensure_collection("c", CollectionConfig(dim=DIM, quantization="int8"), identity("b2", DIM))
    except BundleMismatch as exc:
        out["with_options"] = str(exc)
    out["again"] = store.ensure_collection("c", CollectionConfig(dim=DIM), BUNDLE)
    return out


def test_a_collection_records_its_bundle_and_refuses_another_on_both_backends(tmp_path: Path) -> None:
    edge, client = open_store(tmp_path / "edge"), ClientStore(f"local:{tmp_path / 'local'}")
    a, b = _identity_scenario(edge), _identity_scenario(client)
    edge.close()
    client.close()
    assert a == b
    assert a["recorded"] == BUNDLE and a["again"] is False
    for key in ("same_dim", "with_options"):
        assert f"collection 'c' belongs to bundle b1 (sha256 {BUNDLE.sha256[:12]}" in str(a[key])
        assert "the write uses bundle b2" in str(a[key])
    assert "sha256 ffffffffffff" in str(a["same_version"])
    # Both survive a reopen: the identity is on disk with the collection.
    assert open_store(tmp_path / "edge").collection_identity("c") == BUNDLE
    assert ClientStore(f"local:{tmp_path / 'local'}").collection_identity("c") == BUNDLE


def test_a_collection_without_a_recorded_identity_is_refused(tmp_path: Path) -> None:
    store = open_store(tmp_path / "q")
    store.ensure_collection("c", CollectionConfig(dim=DIM), BUNDLE)
    sidecar = tmp_path / "q" / "c" / "imgtxt_collection.json"
    legacy = {k: v for k, v in json.loads(sidecar.read_text()).items() if k != "bundle"}
    sidecar.write_text(json.dumps(legacy))  # as collections created before identities were recorded
    assert store.collection_identity("c") is None
    with pytest.raises(BundleMismatch, match=r"records no bundle identity .* --recreate"):
        store.ensure_collection("c", CollectionConfig(dim=DIM), BUNDLE)
    store.close()


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
