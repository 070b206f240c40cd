"""The loss table's comparison verdicts: a change within the noise neither holds nor fails."""

from __future__ import annotations

from pathlib import Path

from benchmarks.report import Report
from benchmarks.train_losses import _comparisons


def _verdicts(done: dict[str, dict], noise: float, tmp_path: Path) -> dict[str, str]:
    report = Report("train_losses", [], tmp_path, markdown=True)
    _comparisons(report, done, noise)
    rows = [line.strip("|").split(" | ") for line in report.lines if line.startswith("| ") and "---" not in line]
    return {cells[1]: cells[-1].strip() for cells in rows[1:]}


def test_a_change_within_the_noise_is_undecided(tmp_path: Path) -> None:
    base = {"rsum": 260.0}
    done = {"vsepp_triplet": base, "vsepp+relation": {"rsum": 261.5}, "bcls": {"rsum": 255.0}}
    done["bcls_kendall0.1"] = {"rsum": 262.5}
    verdicts = _verdicts(done, 2.0, tmp_path)
    assert verdicts == {
        "vsepp+relation": "within noise (±2)",
        "bcls": "no",
        "bcls_kendall0.1": "yes",
    }
    # With no noise allowance the same +1.5 counts as holding.
    assert _verdicts(done, 0.0, tmp_path)["vsepp+relation"] == "yes"


def test_only_comparisons_whose_two_options_ran_are_listed(tmp_path: Path) -> None:
    assert _verdicts({"infonce+hierarchical": {"rsum": 250.0}}, 2.0, tmp_path) == {}
