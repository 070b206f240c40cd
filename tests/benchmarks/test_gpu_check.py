"""The prepared GPU check on CPU: its argument handling, its refusal without CUDA, and the results it writes (the
`--device cpu --smoke` path: tiny recipe, tiny export, real services on loopback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import gpu_check


def test_cpu_runs_only_as_a_smoke_check(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--device", "cpu", "--results", str(tmp_path)])
    assert exc.value.code == 2
    assert "--device cpu runs only with --smoke" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_refuses_without_cuda(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    problem = gpu_check.cuda_problem()
    if problem is None:
        pytest.skip("this machine has CUDA: the check would run, not refuse")
    assert gpu_check.main(["--results", str(tmp_path)]) == 2
    assert f"refusing to run without CUDA: {problem}" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no results file claims a GPU run


def test_smoke_run_writes_every_check(tmp_path: Path) -> None:
    assert gpu_check.main(["--device", "cpu", "--smoke", "--results", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check_smoke.json", "gpu_check_smoke.md"]
    saved = json.loads((tmp_path / "gpu_check_smoke.json").read_text())
    assert saved["command"] == f"python -m benchmarks.gpu_check --device cpu --smoke --results {tmp_path}"
    rows = saved["rows"]
    by_check: dict[str, list[dict]] = {}
    for row in rows:
        by_check.setdefault(row["check"], []).append(row)
    (train,) = by_check["train"]
    # The tiny recipe's one epoch: 16 training images in batches of 8.
    assert (train["recipe"], train["device"], train["steps"], train["loss_finite"]) == ("tiny", "cpu", 2, True)
    parity = {(p["modality"], p["precision"]): p for p in by_check["parity"]}
    assert sorted(parity) == [("image", "fp16"), ("image", "fp32"), ("text", "fp16"), ("text", "fp32")]
    for p in parity.values():
        assert p["provider"] == "CPUExecutionProvider" and p["items"] == 16
        assert p["passed"] == (p["min_cosine"] >= gpu_check.MIN_COSINE)
    # The same fp32 graph on the same provider, in a service and in-process: the same numbers.
    assert parity["text", "fp32"]["max_abs_diff"] <= 1e-6 and parity["image", "fp32"]["max_abs_diff"] <= 1e-6
    # fp16 is another graph: close, not identical.
    assert parity["text", "fp16"]["max_abs_diff"] > 0
    speed = {(s["modality"], s["batching"]): s["items_per_s"] for s in by_check["throughput"]}
    assert sorted(speed) == [("image", "off"), ("image", "on"), ("text", "off"), ("text", "on")]
    for rates in speed.values():
        assert sorted(rates) == ["32_clients", "batch_1", "batch_32"] and min(rates.values()) > 0
    (summary,) = by_check["summary"]
    assert summary["passed"] == all(p["passed"] for p in parity.values()) and summary["error"] is None
    assert sorted(summary["stages_s"]) == ["export", "serve", "train"]
    text = (tmp_path / "gpu_check_smoke.md").read_text()
    assert "Written by `benchmarks/gpu_check.py`" in text
    assert "ratio text 32 clients batching on / off" in text and "parity image fp16" in text


def test_a_service_that_cannot_start_fails_the_check_and_keeps_what_ran(tiny_bundle: Path, tmp_path: Path) -> None:
    """The tiny bundle has no fp16 graphs: the fp16 services exit 2 at start (as `--device cuda` does when CUDA fails
    to load), and the results file says so next to the fp32 figures measured before."""
    argv = ["--device", "cpu", "--smoke", "--bundle", str(tiny_bundle), "--results", str(tmp_path)]
    assert gpu_check.main(argv) == 1
    rows = json.loads((tmp_path / "gpu_check_smoke.json").read_text())["rows"]
    assert sorted((r["modality"], r["precision"]) for r in rows if r["check"] == "parity") == [
        ("image", "fp32"),
        ("text", "fp32"),
    ]
    (summary,) = [r for r in rows if r["check"] == "summary"]
    assert summary["passed"] is False
    assert "--precision fp16" in summary["error"] and "exited with code 2" in summary["error"]
    assert "FAILED" in (tmp_path / "gpu_check_smoke.md").read_text()
