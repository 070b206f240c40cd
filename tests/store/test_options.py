"""Collection options are declared once: the flags, their variables, the reopen checks and the docs table agree."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from evaluation.cli import build_parser as eval_parser
from indexer.cli import index_parser
from store.base import CHECKED, COLLECTION_OPTIONS, FLAGS, SERVER_ONLY, CollectionConfig
from store.options import given_collection_options, options_table

ROOT = Path(__file__).resolve().parents[2]


def _docs_table() -> str:
    text = (ROOT / "docs" / "indexing-and-search.md").read_text()
    start = text.index("<!-- collection-options:start")
    body = text[text.index("\n", start) + 1 : text.index("<!-- collection-options:end -->")]
    return body


def test_the_docs_table_is_the_declaration() -> None:
    assert _docs_table() == options_table()
    for o in COLLECTION_OPTIONS:
        assert f"| `{o.flag}` |" in _docs_table()


def test_every_declared_option_is_a_flag_of_each_command_that_creates_collections() -> None:
    for parser in (index_parser(), eval_parser()):
        actions = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
        for o in COLLECTION_OPTIONS:
            action = actions[o.flag]
            assert action.dest == o.dest and action.default is None  # None: "not given"
            assert f"(default: {o.default})" in (action.help or "") and "[env IMGTXT_" in (action.help or "")
            if o.kind == "bool":
                assert isinstance(action, argparse.BooleanOptionalAction)
            if o.kind == "choice":
                assert tuple(action.choices or ()) == o.choices
    # Every field of a collection's config but its dimension is an option, and each is declared once.
    fields = {f.name for f in dataclasses.fields(CollectionConfig)} - {"dim"}
    assert sorted(o.field for o in COLLECTION_OPTIONS) == sorted(fields)


def test_the_checks_and_messages_come_from_the_declaration() -> None:
    assert set(CHECKED) == {"dim"} | {o.field for o in COLLECTION_OPTIONS if o.search_checked}
    assert {f: FLAGS[f] for f in SERVER_ONLY} == {
        "shard_number": "--shards",
        "replication_factor": "--replication-factor",
        "write_consistency_factor": "--write-consistency",
    }
    args = index_parser().parse_args(["src", "--hnsw-m", "8", "--no-on-disk"])
    assert given_collection_options(args) == {"hnsw_m": 8, "on_disk": False}
    assert given_collection_options(index_parser().parse_args(["src"])) == {}


def test_a_variable_gives_an_option_as_its_flag_does(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("IMGTXT_INDEXING_THRESHOLD_KB", "3")
    monkeypatch.setenv("IMGTXT_QUANTIZATION", "int8")
    args = index_parser().parse_args(["src"])
    assert given_collection_options(args) == {"indexing_threshold": 3, "quantization": "int8"}
