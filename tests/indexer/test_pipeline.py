"""The indexing pipeline: mechanics with a trivial encoder, then real ONNX Runtime towers into the embedded engine."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imgtxt.bundle import load_bundle
from imgtxt.encoders.bundle import BundleEncoder
from imgtxt.encoders.types import EncodeJob, EncodeResult, ItemCode, ItemOutcome
from imgtxt.encoders.unit import UnitEncoder
from imgtxt.errors import InvalidInput
from indexer.cli import main as index_main
from indexer.pipeline import IndexConfig, run_index
from indexer.reader import SourceRecord, read_records, shard_of
from store.base import CollectionConfig, DimensionMismatch
from store.factory import open_store
from store.ids import point_id
from tests.conftest import make_dataset
from tests.store.identities import identity

DIM = 8


class HashEncoder:
    """Deterministic stand-in for the pipeline-mechanics tests only: a vector from the item's sha1."""

    dim = DIM
    bundle_version = "hash-v1"
    identity = identity("hash-v1", DIM)

    @staticmethod
    def _vec(data: bytes) -> np.ndarray:
        v = np.frombuffer(hashlib.sha256(data).digest()[: DIM * 4], dtype=np.uint32).astype(np.float32) + 1
        return v / np.linalg.norm(v)

    def _encode(self, items: list[bytes]) -> EncodeResult:
        outcomes = [ItemOutcome() if it else ItemOutcome(ItemCode.INVALID_ARGUMENT, "empty") for it in items]
        rows = [self._vec(it) if it else np.zeros(DIM, np.float32) for it in items]
        return EncodeResult(np.stack(rows) if rows else np.zeros((0, DIM), np.float32), outcomes)

    def encode_images(self, images: list[bytes]) -> EncodeResult:
        return self._encode(images)

    def encode_texts(self, texts: list[str]) -> EncodeResult:
        return self._encode([t.encode() for t in texts])

    def encode_jobs(self, jobs: Iterable[EncodeJob]) -> Iterator[tuple[EncodeResult, EncodeResult]]:
        for job in jobs:
            yield self.encode_images(job.images), self.encode_texts(job.texts)

    def close(self) -> None:
        pass


def _texts(n: int) -> list[SourceRecord]:
    return [SourceRecord(f"t{i}", None, (f"text {i}",) if i % 7 else ("",)) for i in range(n)]


@pytest.mark.parametrize("location", ["edge", ":memory:"])
def test_pipeline_writes_every_point_once_in_batches(tmp_path: Path, location: str) -> None:
    store = open_store(tmp_path / "q" if location == "edge" else location)
    report = run_index(
        _texts(23),
        HashEncoder(),
        store,
        "c",
        CollectionConfig(dim=DIM),
        IndexConfig(batch_size=4, queue_depth=1),
        rejects=tmp_path / "rejects.jsonl",
    )
    points = store.dump("c")
    # 23 texts, of which t0, t7, t14, t21 are empty: rejected as bad input, listed with their key and reason.
    assert report.indexed == {"text": 19} and report.skipped == 4 and report.failed == 0
    assert set(points) == {point_id("text", f"t{i}#0") for i in range(23) if i % 7}
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rejects] == ["t0#0", "t7#0", "t14#0", "t21#0"]
    payload, vectors = points[point_id("text", "t3#0")]
    assert payload["text"] == "text 3" and payload["kind"] == "text" and payload["bundle_version"] == "hash-v1"
    np.testing.assert_allclose(vectors["text"], HashEncoder._vec(b"text 3"), atol=1e-6)
    store.close()


def test_checkpointed_job_resumes_without_redoing(tmp_path: Path) -> None:
    store = open_store(tmp_path / "q")
    cp = tmp_path / "cp.json"
    kw: dict[str, Any] = {
        "checkpoint": cp,
        "job": {"source": "x"},
        "config": IndexConfig(batch_size=5, checkpoint_every=1),
    }
    first = run_index(_texts(12), HashEncoder(), store, "c", CollectionConfig(dim=DIM), **kw)
    assert json.loads(cp.read_text())["done"] and first.records == 12
    again = run_index(_texts(12), HashEncoder(), store, "c", CollectionConfig(dim=DIM), **kw)
    assert again.resumed_from == 12 and again.indexed == first.indexed
    with pytest.raises(InvalidInput, match="another job"):
        run_index(_texts(12), HashEncoder(), store, "c", CollectionConfig(dim=DIM), **{**kw, "job": {"source": "y"}})
    store.close()


def test_shards_partition_the_input(dataset: Path) -> None:
    keys = [r.key for r in read_records(dataset)]
    shards = [[r.key for r in read_records(dataset, shard_index=i, num_shards=3)] for i in range(3)]
    assert sorted(k for s in shards for k in s) == sorted(keys)
    assert all(shard_of(k, 3) == i for i, s in enumerate(shards) for k in s)


def test_dimension_mismatch_is_raised_before_any_write(tmp_path: Path) -> None:
    store = open_store(tmp_path / "q")
    store.ensure_collection("c", CollectionConfig(dim=DIM * 2), identity("wide", DIM * 2))
    with pytest.raises(DimensionMismatch, match="dimension 16"):
        run_index(_texts(3), HashEncoder(), store, "c", CollectionConfig(dim=DIM))
    assert store.count("c") == 0
    store.close()


def test_index_dataset_with_real_towers(
    dataset: Path, tmp_path: Path, encoder: BundleEncoder, tiny_bundle: Path
) -> None:
    store = open_store(tmp_path / "q")
    fusion = UnitEncoder(load_bundle(tiny_bundle))
    report = run_index(
        read_records(dataset),
        encoder,
        store,
        "tiny",
        CollectionConfig(dim=encoder.dim),
        IndexConfig(batch_size=5),
        fusion=fusion,
        rejects=tmp_path / "rejects.jsonl",
    )
    # 12 good images x 2 captions, plus a record whose image file is missing: its image, its 2 captions (a caption
    # belongs to its image) and its 2 units are rejected.
    assert report.indexed == {"image": 12, "text": 24, "unit": 24}
    assert report.skipped == 5 and report.failed == 0
    assert report.fusion == "trained" and report.created and report.collection_config["quantization"] == "none"
    points = store.dump("tiny")
    assert len(points) == 60
    image = (dataset / "images" / "img0003.jpg").read_bytes()
    v = encoder.encode_images([image]).embeddings[0]
    t = encoder.encode_texts(["photo 3 shows thing 1 in colour 10"]).embeddings[0]
    np.testing.assert_allclose(points[point_id("image", "img0003.jpg")][1]["image"], v, atol=1e-5)
    unit_payload, unit = points[point_id("unit", "img0003.jpg#1")]
    assert unit_payload["image_key"] == "img0003.jpg" and unit_payload["caption_index"] == 1
    assert unit_payload["fusion"] == "trained"  # each unit says which fusion made it
    np.testing.assert_allclose(unit["unit"], fusion.fuse(v[None], t[None])[0], atol=1e-5)
    assert fusion.kind == "trained"
    store.close()


def test_cli_index_is_idempotent_and_strict(dataset: Path, tmp_path: Path, tiny_bundle: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    store = tmp_path / "q"
    argv = [
        str(dataset),
        "--bundle",
        str(tiny_bundle),
        "--in-process",
        "--device",
        "cpu",
        "--store",
        str(store),
        "--batch-size",
        "4",
        "--json",
        "-",
        "--no-progress",
    ]
    assert index_main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert index_main([*argv, "--restart", "--strict"]) == 1  # the missing image counts against --strict
    second = json.loads(capsys.readouterr().out)
    assert first["indexed"] == second["indexed"] == {"image": 12, "text": 24, "unit": 24}
    s = open_store(store)
    assert s.count("tiny-d32-s0") == 60  # re-running overwrote: no duplicates
    assert s.count("tiny-d32-s0", {"kind": "unit"}) == 24
    s.close()


def test_two_shard_jobs_together_equal_one_job(dataset: Path, tmp_path: Path, tiny_bundle: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    base = [str(dataset), "--bundle", str(tiny_bundle), "--in-process", "--device", "cpu", "--no-progress"]
    base += ["--json", "-"]
    assert index_main([*base, "--store", str(tmp_path / "one")]) == 0
    for shard in ("0", "1"):
        assert index_main([*base, "--store", str(tmp_path / "two"), "--shard-index", shard, "--num-shards", "2"]) == 0
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert 0 < reports[1]["records"] < reports[0]["records"]  # each shard did part of the work
    one, two = open_store(tmp_path / "one"), open_store(tmp_path / "two")
    assert one.dump("tiny-d32-s0").keys() == two.dump("tiny-d32-s0").keys() and one.count("tiny-d32-s0") == 60
    one.close()
    two.close()


def _in_process(bundle: Path, store: Path) -> list[str]:
    return ["--bundle", str(bundle), "--in-process", "--device", "cpu", "--store", str(store), "--no-progress"]


def test_bad_manifest_lines_and_bad_images_are_rejects_not_aborts(tmp_path: Path, tiny_bundle: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = make_dataset(tmp_path / "data", 2, captions=1)
    (data / "images" / "broken.jpg").write_bytes(b"not a jpeg at all")
    lines = [
        json.dumps({"id": "a", "image": "images/img0000.jpg", "captions": ["first"]}),
        "{this line is not JSON",
        json.dumps({"id": "broken", "image": "images/broken.jpg", "captions": ["of a corrupt image"]}),
        json.dumps({"id": "gone", "image": "images/missing.jpg", "captions": ["of a missing image"]}),
        json.dumps({"payload": {"no": "content"}}),
        json.dumps({"id": "b", "image": "images/img0001.jpg", "captions": ["second", "third"]}),
    ]
    (data / "m.jsonl").write_text("\n".join(lines) + "\n")
    rejects = tmp_path / "rejects.jsonl"
    argv = [str(data / "m.jsonl"), *_in_process(tiny_bundle, tmp_path / "q"), "--rejects", str(rejects)]
    assert index_main([*argv, "--json", "-", "--batch-size", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["indexed"] == {"image": 2, "text": 3, "unit": 3} and report["records"] == 6
    listed = [json.loads(line) for line in rejects.read_text().splitlines()]
    by_key = {(r["key"], r["kind"]): r for r in listed}
    assert (
        by_key[("m.jsonl:2", "record")]["line"] == 2 and "not valid JSON" in by_key[("m.jsonl:2", "record")]["reason"]
    )
    assert by_key[("m.jsonl:5", "record")]["reason"] == "line 5: a record needs an 'image', a 'text' or 'captions'"
    # The captions of the corrupt and the missing image are rejected with them, naming why and the line.
    assert by_key[("broken#0", "text")]["reason"].startswith("its image was rejected:")
    assert by_key[("broken#0", "text")]["line"] == 3
    assert (
        by_key[("gone#0", "text")]["reason"] == "its image was rejected: cannot read image: No such file or directory"
    )
    assert {k for k in by_key} >= {("broken", "image"), ("broken#0", "unit"), ("gone", "image"), ("gone#0", "unit")}
    assert report["skipped"] == len(listed) == 8 and report["rejects_file"] == str(rejects)
    # So every caption's image_key names an image point that exists.
    s = open_store(tmp_path / "q")
    points = s.dump("tiny-d32-s0")
    s.close()
    image_keys = {p["key"] for p, _ in points.values() if p["kind"] == "image"}
    assert image_keys == {"a", "b"}
    assert {p["image_key"] for p, _ in points.values() if p["kind"] in ("text", "unit")} == image_keys


def test_text_only_jobs_do_not_read_images_and_name_none(tmp_path: Path, tiny_bundle: Path, dataset: Path) -> None:
    assert index_main([str(dataset), *_in_process(tiny_bundle, tmp_path / "q"), "--kinds", "text"]) == 0
    s = open_store(tmp_path / "q")
    payloads = [p for p, _ in s.dump("tiny-d32-s0").values()]
    s.close()
    # 13 records x 2 captions, the missing image's too: no image is read, and no payload names an image point.
    assert len(payloads) == 26 and not any("image_key" in p for p in payloads)


def test_report_names_a_rejects_file_only_when_one_was_written(tmp_path: Path, tiny_bundle: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    clean = make_dataset(tmp_path / "clean", 3, captions=1)
    argv = [str(clean), *_in_process(tiny_bundle, tmp_path / "q"), "--kinds", "image,text"]
    assert index_main(argv) == 0
    out = capsys.readouterr().out
    cp_dir = tmp_path / "q" / "_checkpoints" / "tiny-d32-s0"
    assert "rejects listed" not in out and not list(cp_dir.glob("rejects-*"))
    assert index_main([*argv, "--json", str(tmp_path / "report.json")]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["rejects_file"] is None
    assert "indexed" in capsys.readouterr().out  # --json PATH writes the file and still prints the summary
    bad = make_dataset(tmp_path / "bad", 3, captions=1, missing=1)
    assert index_main([str(bad), *_in_process(tiny_bundle, tmp_path / "q2"), "--kinds", "image,text"]) == 0
    listed = tmp_path / "q2" / "_checkpoints" / "tiny-d32-s0" / "rejects-0-of-1.jsonl"
    assert f"rejects listed in {listed}" in capsys.readouterr().out and listed.is_file()
