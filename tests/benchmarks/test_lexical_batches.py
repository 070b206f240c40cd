"""The lexical-batch measurement script on the synthetic captions: one row per sampler, lexical above random."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.lexical_batches import main
from tests.trainer.conftest import write_synthetic_dataset


def test_lexical_batches_measures_each_sampler(tmp_path: Path) -> None:
    data = write_synthetic_dataset(tmp_path / "data")
    assert main(["--data", str(data), "--batch-size", "4", "--group-sizes", "2", "--results", str(tmp_path)]) == 0
    rows = {r["sampler"]: r for r in json.loads((tmp_path / "lexical_batches.json").read_text())["rows"]}
    assert set(rows) == {"random", "lexical_neighbours=2"}
    # Groups of 2 are the twin images with the same captions (label 1), so every caption has a close negative.
    assert rows["lexical_neighbours=2"]["anchors_with_close_negative"] == 1.0
    assert rows["lexical_neighbours=2"]["mean_nearest_label"] == 1.0
    assert rows["random"]["mean_nearest_label"] < 1.0
    assert "| lexical_neighbours=2 |" in (tmp_path / "lexical_batches.md").read_text()
