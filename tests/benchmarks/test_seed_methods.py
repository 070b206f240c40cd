"""The seed-method protocol: paired intervals, the verdict rule, lexical labels, and one tiny end-to-end table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.seed_methods import lexical_labels, paired_interval, verdict
from tests.trainer.conftest import write_synthetic_dataset


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 train + 8 val coloured squares (tests/trainer's dataset)."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"))


def test_paired_interval_is_the_student_t_interval_of_the_differences() -> None:
    # Differences 1, 2, 3, 4: mean 2.5, sd sqrt(5/3), sem sd/2, t(.975, 3) = 3.182446...
    mean, low, high = paired_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2
    assert mean == pytest.approx(2.5)
    assert (low, high) == (pytest.approx(2.5 - half), pytest.approx(2.5 + half))
    assert math.isnan(paired_interval([1.0])[1])
    assert paired_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)  # no spread: the point itself


def test_verdict_follows_the_rule() -> None:
    assert verdict(3.0, 1.0, 5.0, 2.0) == "holds"
    assert verdict(1.5, 0.5, 2.5, 2.0) == "above 0, below the claimed 2 points"
    assert verdict(1.5, 0.5, 2.5, None).startswith("direction holds")
    assert verdict(1.0, -0.5, 2.5, None) == "not established"
    assert verdict(-2.0, -3.0, -0.5, 2.0) == "does not hold"
    assert verdict(1.0, math.nan, math.nan, None).startswith("not established")


def test_lexical_labels_leave_the_caption_itself_out() -> None:
    # Image 0: "red dog", "red cat"; image 1: "blue sky". Caption 0 against image 0: only caption 1 counts
    # (Jaccard {red, dog} vs {red, cat} = 1/3), not its own 1.0. Caption 2 against image 0: 0.
    captions = ["a red dog", "a red cat", "the blue sky"]
    labels = lexical_labels(captions, np.array([0, 0, 1]))
    assert labels.shape == (2, 3)
    assert labels[0].tolist() == pytest.approx([1 / 3, 1 / 3, 0.0])
    # Image 1 has one caption: against itself nothing is left (0), against the others their Jaccard with it (0).
    assert labels[1].tolist() == pytest.approx([0.0, 0.0, 0.0])


def test_seed_methods_runs_paired_seeds_and_reuses_them(synthetic_data: Path, tmp_path: Path) -> None:
    from benchmarks import seed_methods

    argv = ["--recipe", "tiny", "--data", str(synthetic_data), "--out", str(tmp_path / "runs")]
    arms = "vsepp,vsepp+relation,infonce_global,infonce+hierarchical"
    argv += ["--papers", "hrem,hierarchical", "--arms", arms, "--seeds", "0,1", "--epochs", "2"]
    argv += ["--dev-images", "4", "--results", str(tmp_path / "results"), "--set", f"cache_dir={tmp_path / 'cache'}"]
    argv += ["--set", "train_limit=0", "--set", "val_limit=0"]
    assert seed_methods.main(argv) == 0
    saved = json.loads((tmp_path / "results" / "seed_methods.json").read_text())["rows"]
    runs = {(r["arm"], r["seed"]): r for r in saved["runs"]}
    assert set(runs) == {(a, s) for a in arms.split(",") for s in (0, 1)}
    for r in runs.values():
        assert 1 <= r["epoch"] <= 2 and r["epochs"] == 2 and 0 <= r["i2t_map_r"] <= 100
    # The hierarchical runs are re-mixed after training; the trained share (0.2) is the run's own figure.
    hier = runs[("infonce+hierarchical", 0)]
    assert {"mix_w0_rsum", "mix_w0.5_rsum"} <= set(hier) and "mix_w0_rsum" not in runs[("vsepp", 0)]
    (comparison,) = saved["papers"][0]["comparisons"]
    expected = [runs[("vsepp+relation", s)]["rsum"] - runs[("vsepp", s)]["rsum"] for s in (0, 1)]
    assert comparison["differences"] == pytest.approx(expected)
    table = (tmp_path / "results" / "seed_methods.md").read_text()
    assert "### HREM (seed 002)" in table and "vsepp+relation − vsepp" in table
    assert "local share swept after training" in table
    # Units: every run with a unit head is scored leave-one-caption-out, with captions and keyword queries.
    assert "### Multi-modal units (seed 003)" in table and "| keywords: trained − image |" in table
    vsepp = runs[("vsepp", 0)]
    assert all(0 <= vsepp[f"unit_{q}_{f}_r1"] <= 100 for q in ("caption", "keywords") for f in ("trained", "sum"))
    assert "unit_caption_trained_r1" not in hier  # the hierarchical model has no unit head
    # The same seed trains the same batches and head initialisation: the baseline reruns to the same figures.
    config = (tmp_path / "runs" / "tiny-vsepp-s1" / "config.yaml").read_text()
    assert "seed: 1" in config and "dev_images: 4" in config
    assert seed_methods.main([*argv, "--report-only", "--tag", "again"]) == 0
    again = json.loads((tmp_path / "results" / "seed_methods_again.json").read_text())["rows"]
    assert again["papers"] == saved["papers"]


def test_keyword_queries_keep_the_content_words_in_order() -> None:
    from benchmarks.seed_methods import keyword_query

    assert keyword_query("A black dog is running on the grass .") == "black dog running grass"


def test_mix_sweep_recovers_both_parts_and_remixes_them() -> None:
    from benchmarks.seed_methods import mix_sweep

    rng = np.random.default_rng(0)

    def unit(n: int, d: int) -> np.ndarray:
        v = rng.normal(size=(n, d))
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    gi, gt, li, lt = unit(3, 4), unit(5, 4), unit(3, 2), unit(5, 2)
    w0 = 0.2
    served_i = np.hstack([math.sqrt(1 - w0) * gi, math.sqrt(w0) * li])
    served_t = np.hstack([math.sqrt(1 - w0) * gt, math.sqrt(w0) * lt])
    sims = mix_sweep(served_i, served_t, dim=4, trained_weight=w0)
    assert sims[0.0] == pytest.approx(gi @ gt.T)
    assert sims[0.2] == pytest.approx(served_i @ served_t.T)  # the trained mix is the served cosine
    assert sims[0.5] == pytest.approx(0.5 * gi @ gt.T + 0.5 * li @ lt.T)
    with pytest.raises(ValueError, match="local_weight"):
        mix_sweep(served_i, served_t, dim=4, trained_weight=0.0)


def test_a_run_directory_is_claimed_by_one_live_process(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from benchmarks.seed_methods import CLAIM, _claim

    assert _claim(tmp_path / "r")  # free: claimed
    assert (tmp_path / "r" / CLAIM).read_text() == str(os.getpid())
    assert not _claim(tmp_path / "r")  # held by a live process (this one)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "r" / CLAIM).write_text(dead.stdout.strip())
    assert _claim(tmp_path / "r")  # a finished process's claim is stale: taken over


def test_every_arm_and_paper_is_a_valid_config() -> None:
    from benchmarks.seed_methods import ARMS, PAPERS
    from trainer.config import load_config
    from trainer.losses import CombinedLoss
    from trainer.train import resolve_sampling

    for arm, overrides in ARMS.items():
        cfg = resolve_sampling(load_config("quick", None, [*overrides, "dev_images=500"]))
        CombinedLoss(cfg.loss.weights_for(cfg.model), cfg.loss.kwargs, model=cfg.model)  # builds: kwargs are valid
        assert cfg.data.dev_images == 500, arm
    for paper in PAPERS:
        assert {paper.method, *paper.baselines, *paper.controls} <= set(ARMS), paper.key


def test_results_are_strict_json() -> None:
    from benchmarks.seed_methods import json_safe

    row = {"mean": 1.0, "low": math.nan, "pairs": [math.nan, 2.0], "arm": "vsepp"}
    assert json.loads(json.dumps(json_safe(row), allow_nan=False)) == {
        "mean": 1.0,
        "low": None,
        "pairs": [None, 2.0],
        "arm": "vsepp",
    }


def test_a_paper_compares_its_extra_pairs(tmp_path: Path) -> None:
    from benchmarks.report import Report
    from benchmarks.seed_methods import PAPERS, _paper

    margin = next(p for p in PAPERS if p.key == "margin")
    refined, unrefined = margin.pairs[0]
    arms = (*margin.baselines, margin.method, *margin.controls)
    runs = {
        (arm, s): {"rsum": 200.0 + k + 0.5 * s * k, "last_rsum": 199.0 + k, "dev_rsum": 100.0 + k, "epoch": 1}
        for k, arm in enumerate(arms)
        for s in (0, 1, 2)
    }
    summary = _paper(Report("t", [], tmp_path), margin, runs, [0, 1, 2])
    assert summary is not None
    got = {(c["arm"], c["against"]): c for c in summary["comparisons"]}
    expected = [runs[(refined, s)]["rsum"] - runs[(unrefined, s)]["rsum"] for s in (0, 1, 2)]
    assert got[(refined, unrefined)]["differences"] == pytest.approx(expected)


def _comparisons_of(tmp_path: Path, key: str, tuned: str) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
    """A paper's section over two seeds of made-up runs in which `tuned` has the best dev rSum, and its comparisons."""
    from benchmarks.report import Report
    from benchmarks.seed_methods import PAPERS, _paper

    paper = next(p for p in PAPERS if p.key == key)
    arms = (*paper.baselines, paper.method, *paper.controls)
    runs = {
        (arm, s): {"rsum": 200.0 + k + s, "last_rsum": 200.0, "dev_rsum": 300.0 if arm == tuned else 100.0, "epoch": 1}
        for k, arm in enumerate(arms)
        for s in (0, 1)
    }
    summary = _paper(Report("t", [], tmp_path), paper, runs, [0, 1])
    return summary, [(c["arm"], c["against"]) for c in (summary or {}).get("comparisons", [])]


def test_a_pair_that_repeats_a_control_against_the_baseline_is_listed_once(tmp_path: Path) -> None:
    tuned = "infonce_global_t0.05"
    summary, listed = _comparisons_of(tmp_path, "hierarchical", tuned)
    assert summary is not None and summary["baseline"] == tuned
    assert len(listed) == len(set(listed))
    assert ("infonce+hierarchical_t0.05", tuned) in listed  # a control against the tuned baseline, and a pair
    assert ("infonce+hierarchical", "infonce_global") in listed  # the twin at the recipe's temperature


def test_a_pair_that_turns_a_method_control_comparison_around_is_listed_once_in_its_orientation(
    tmp_path: Path,
) -> None:
    summary, comparisons = _comparisons_of(tmp_path, "hrem", "vsepp_m0.1")
    assert summary is not None
    listed = {frozenset(pair): pair for pair in comparisons}
    assert len(listed) == len(comparisons)  # no comparison twice, in either orientation
    assert listed[frozenset(("vsepp+relation_relevance", "vsepp+relation"))] == (
        "vsepp+relation_relevance",
        "vsepp+relation",
    )
    assert listed[frozenset(("vsepp+relation", "vsepp+relation_self"))] == ("vsepp+relation", "vsepp+relation_self")


def test_run_figures_take_the_dev_chosen_epoch_and_its_mean_margin(tmp_path: Path) -> None:
    from benchmarks.seed_methods import MEAN_MARGIN, run_figures

    recall = dict.fromkeys(("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"), 1.0)
    records = [
        {"epoch": 1, "rsum": 100.0, "dev_rsum": 150.0, f"train_{MEAN_MARGIN}": 0.17, **recall},
        {"epoch": 2, "rsum": 120.0, "dev_rsum": 140.0, f"train_{MEAN_MARGIN}": 0.18, **recall},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    got = run_figures(tmp_path)
    assert (got["epoch"], got["rsum"], got["last_rsum"], got[MEAN_MARGIN]) == (1, 100.0, 120.0, 0.17)
    records = [{k: v for k, v in r.items() if k != f"train_{MEAN_MARGIN}"} for r in records]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert MEAN_MARGIN not in run_figures(tmp_path)  # only the adaptive margin logs one
