"""The read stage: manifests, folders and datasets become records with stable keys, in a stable order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgtxt.errors import InvalidInput
from indexer.ids import point_id
from indexer.reader import SourceRecord, load_record, read_records


def test_manifest_records(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"jpeg bytes")
    lines = [
        {"id": "one", "image": "a.jpg", "text": "a caption", "payload": {"lang": "en"}},
        {"text": "only text"},
        {"image": "a.jpg", "captions": ["x", "y"]},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    recs = list(read_records(tmp_path / "m.jsonl"))
    assert recs[0] == SourceRecord("one", (tmp_path / "a.jpg").resolve(), ("a caption",), {"lang": "en"})
    assert recs[1].image is None and recs[1].texts == ("only text",) and recs[1].key.startswith("text:")
    assert recs[2].key == "a.jpg" and recs[2].texts == ("x", "y") and recs[2].text_key(1) == "a.jpg#1"
    assert load_record(recs[0]).image_bytes == b"jpeg bytes"
    assert "cannot read image" in (load_record(SourceRecord("k", tmp_path / "nope.jpg")).image_error or "")
    assert [r.key for r in read_records(tmp_path / "m.jsonl", limit=2)] == ["one", recs[1].key]


def test_bad_manifest_line_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text('{"text": "ok"}\n{"payload": {}}\n')
    with pytest.raises(InvalidInput, match=r"m\.jsonl:2"):
        list(read_records(tmp_path / "m.jsonl"))


def test_folder_records_sorted_by_relative_path(tmp_path: Path) -> None:
    for name in ("b/2.png", "a.jpg", "b/1.JPEG", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [r.key for r in read_records(tmp_path)] == ["a.jpg", "b/1.JPEG", "b/2.png"]


def test_point_ids_are_deterministic_and_kind_specific() -> None:
    assert point_id("image", "a.jpg") == point_id("image", "a.jpg") != point_id("unit", "a.jpg")
    with pytest.raises(ValueError, match="kind must be one of"):
        point_id("video", "a")
