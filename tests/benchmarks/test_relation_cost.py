"""The relation-cost benchmark runs every form and writes one row per form, the similarity form as its unit."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import relation_cost


def test_every_form_is_timed_against_the_similarity_form(tmp_path: Path) -> None:
    argv = ["--batch", "6", "--tokens", "5", "--grid", "2", "--repeats", "1", "--results", str(tmp_path)]
    assert relation_cost.main(argv) == 0
    rows = json.loads((tmp_path / "relation_cost.json").read_text())["rows"]
    assert [r["form"] for r in rows] == list(relation_cost.FORMS)
    assert rows[0]["ratio"] == 1.0 and all(r["median_s"] > 0 and len(r["steps_s"]) == 1 for r in rows)
    assert "| learned |" in (tmp_path / "relation_cost.md").read_text()
