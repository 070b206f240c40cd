"""One CLI grammar: a flag has the same type and meaning in `imgtxt index`, `search`, `eval` and `demo`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest

from demo.cli import build_parser as demo_parser
from evaluation.cli import build_parser as eval_parser
from imgtxt.flags import default_home
from indexer.cli import index_parser
from search.cli import search_parser
from store.options import DEFAULT_STORE

PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "index": index_parser,
    "search": search_parser,
    "eval": eval_parser,
    "demo": demo_parser,
}
# Flags whose default differs by command, on purpose and documented in --help: eval's store is a temporary one
# unless named (or the default store with --reuse); the demo keeps its --artifacts layout; index's split is None
# only so a manifest or folder (which have no splits) can refuse an explicit one; its rule is eval's: val.
DEFAULT_EXCEPTIONS = {"--store", "--split"}


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {o: a for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}


def test_a_shared_flag_has_one_type_and_default_everywhere() -> None:
    options = {name: _options(make()) for name, make in PARSERS.items()}
    shared = {o for opts in options.values() for o in opts if sum(o in other for other in options.values()) > 1}
    assert {"--json", "--limit", "--split", "--batch-size", "--store", "--bundle", "--data"} <= shared
    for option in sorted(shared):
        actions = {name: opts[option] for name, opts in options.items() if option in opts}
        kinds = {(type(a).__name__, getattr(a.type, "__name__", a.type), a.choices, a.nargs) for a in actions.values()}
        assert len(kinds) == 1, f"{option} differs between commands: {actions}"
        if option not in DEFAULT_EXCEPTIONS:
            defaults = {repr(a.default) for a in actions.values()}
            assert len(defaults) == 1, f"{option} has different defaults: {defaults}"
    for name, opts in options.items():
        assert opts["--json"].metavar == "PATH" and "'-': print the JSON instead" in (opts["--json"].help or ""), name
        if name != "search":
            assert "first N records" in (opts["--limit"].help or ""), name
    # --limit is about the input; search has none, so its result count is --top-k.
    assert "--top-k" in options["search"] and "--limit" not in options["search"]


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_help_shows_defaults_and_variables(command: str) -> None:
    text = " ".join(PARSERS[command]().format_help().split())
    assert "(default: None)" not in text
    assert "[env IMGTXT_JSON]" in text
    if command != "search":
        assert "(default: 32)" in text and "[env IMGTXT_LIMIT]" in text  # --batch-size, --limit
    if command in ("index", "search"):
        assert f"(default: {DEFAULT_STORE})" in text


def test_the_default_store_is_absolute_and_per_user(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Path(DEFAULT_STORE).is_absolute()
    assert default_home({"IMGTXT_HOME": "/srv/imgtxt", "XDG_DATA_HOME": "/d"}) == Path("/srv/imgtxt")
    assert default_home({"XDG_DATA_HOME": "/d"}) == Path("/d/imgtxt")
    monkeypatch.setenv("HOME", "/home/u")
    assert default_home({}) == Path("/home/u/.local/share/imgtxt")
    assert default_home({"XDG_DATA_HOME": "relative/dir"}) == Path("/home/u/.local/share/imgtxt")  # XDG: ignored
