"""`imgtxt search`: --top-k, --json PATH|-, filters, and the IMGTXT_* variables its --help advertises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from indexer.cli import main as index_main
from search.cli import main as search_main
from tests.conftest import make_dataset


@pytest.fixture(scope="module")
def store(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("search")
    data = make_dataset(root / "data", 8, captions=2)
    location = root / "q"
    argv = [str(data), "--bundle", str(tiny_bundle), "--in-process", "--device", "cpu", "--store", str(location)]
    assert index_main([*argv, "--no-progress", "--kinds", "image,text"]) == 0
    return location


@pytest.fixture()
def common(store: Path, tiny_bundle: Path) -> list[str]:
    return ["--bundle", str(tiny_bundle), "--in-process", "--device", "cpu", "--store", str(store)]


def test_top_k_and_the_json_rule(common: list[str], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    query = ["--text", "photo 3 shows thing 1", "--top-k", "4"]
    assert search_main([*query, *common, "--json", "-"]) == 0
    hits = json.loads(capsys.readouterr().out)  # only the JSON on stdout
    assert len(hits) == 4 and all(h["payload"]["kind"] == "image" for h in hits)
    out = tmp_path / "hits.json"
    assert search_main([*query, *common, "--json", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert json.loads(out.read_text()) == hits and len(printed) == 4 and printed[0].startswith("  1  ")
    # --limit means "the first N records of the input" everywhere, so search's result count is --top-k.
    with pytest.raises(SystemExit):
        search_main([*query, *common, "--limit", "4"])


def test_advertised_variables_are_honoured(common: list[str], monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("IMGTXT_TEXT", "photo 3 shows thing 1")
    monkeypatch.setenv("IMGTXT_TOP_K", "3")
    monkeypatch.setenv("IMGTXT_TARGET", "text")
    monkeypatch.setenv("IMGTXT_FILTER", "caption_index=1")
    monkeypatch.setenv("IMGTXT_JSON", "-")
    assert search_main(common) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and all(h["payload"]["kind"] == "text" and h["payload"]["caption_index"] == 1 for h in hits)
    # A flag beats its variable, --filter included.
    assert search_main([*common, "--filter", "caption_index=0", "--top-k", "2"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2 and all(h["payload"]["caption_index"] == 0 for h in hits)


def test_one_query_exactly(common: list[str], capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit):
        search_main(common)
    assert "give exactly one query" in capsys.readouterr().err
