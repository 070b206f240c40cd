"""The read stage: manifests, folders and datasets become records with stable keys, in a stable order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgtxt.errors import InvalidInput
from indexer.reader import SourceRecord, load_record, read_records
from store.ids import point_id


def test_manifest_records(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"jpeg bytes")
    lines = [
        {"id": "one", "image": "a.jpg", "text": "a caption", "payload": {"lang": "en"}},
        {"text": "only text"},
        {"image": "a.jpg", "captions": ["x", "y"]},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    recs = list(read_records(tmp_path / "m.jsonl"))
    assert recs[0] == SourceRecord("one", (tmp_path / "a.jpg").resolve(), ("a caption",), {"lang": "en"}, line=1)
    assert recs[1].image is None and recs[1].texts == ("only text",) and recs[1].key.startswith("text:")
    assert recs[2].key == "a.jpg" and recs[2].texts == ("x", "y") and recs[2].text_key(1) == "a.jpg#1"
    assert load_record(recs[0]).image_bytes == b"jpeg bytes"
    assert "cannot read image" in (load_record(SourceRecord("k", tmp_path / "nope.jpg")).image_error or "")
    assert [r.key for r in read_records(tmp_path / "m.jsonl", limit=2)] == ["one", recs[1].key]


def test_bad_manifest_lines_become_records_naming_the_line(tmp_path: Path) -> None:
    lines = [
        '{"text": "ok"}',
        '{"payload": {}}',
        "{not json",
        '["a list"]',
        '{"text": "fine", "payload": 3}',
        '{"captions": "one string"}',
    ]
    (tmp_path / "m.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "\xff"}\n')
    recs = list(read_records(tmp_path / "m.jsonl"))
    # Every line is a record in the stable order (resume counts them); the bad ones carry their reason and line.
    assert [r.line for r in recs] == [1, 2, 3, 4, 5, 6, 7]
    assert recs[0].error is None and recs[0].texts == ("ok",)
    assert [r.key for r in recs[1:]] == [f"m.jsonl:{n}" for n in range(2, 8)]
    reasons = [r.error or "" for r in recs[1:]]
    assert reasons[0] == "line 2: a record needs an 'image', a 'text' or 'captions'"
    assert reasons[1].startswith("line 3: not valid JSON")
    assert reasons[2] == "line 4: each line must be a JSON object, got list"
    assert reasons[3] == "line 5: 'payload' must be a JSON object"
    assert reasons[4] == "line 6: 'captions' must be a list of strings"
    assert reasons[5].startswith("line 7: not valid UTF-8")


def test_split_applies_to_datasets_only(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text('{"text": "ok"}\n')
    with pytest.raises(InvalidInput, match="--split val applies to dataset sources only"):
        list(read_records(tmp_path / "m.jsonl", split="val"))


def test_folder_records_sorted_by_relative_path(tmp_path: Path) -> None:
    for name in ("b/2.png", "a.jpg", "b/1.JPEG", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [r.key for r in read_records(tmp_path)] == ["a.jpg", "b/1.JPEG", "b/2.png"]


def test_point_ids_are_deterministic_and_kind_specific() -> None:
    assert point_id("image", "a.jpg") == point_id("image", "a.jpg") != point_id("unit", "a.jpg")
    with pytest.raises(ValueError, match="kind must be one of"):
        point_id("video", "a")
