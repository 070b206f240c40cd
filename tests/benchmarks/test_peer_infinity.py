"""The peer benchmark's pure parts: percentiles, medians, ratios, the "why" lines, stage means, the peer venv gate."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from benchmarks import peer_infinity as pi


def _fig(rate: float, p50: float, p99: float) -> dict[str, float]:
    return {"items_per_s": rate, "p50_ms": p50, "p99_ms": p99}


def test_summarize_interpolates_the_p99_between_the_two_largest_latencies() -> None:
    out = pi.summarize([0.001] * 99 + [0.1], elapsed_s=0.5)
    assert out["items_per_s"] == pytest.approx(200.0)
    assert out["p50_ms"] == pytest.approx(1.0)
    assert out["p99_ms"] == pytest.approx(1.0 + 0.01 * 99.0)  # position 98.01 of 0..99


def test_median_of_takes_each_figure_on_its_own() -> None:
    rounds = [_fig(100, 5, 50), _fig(300, 1, 10), _fig(200, 9, 30)]
    assert pi.median_of(rounds) == _fig(200, 5, 30)


def test_compare_puts_ours_over_the_peer() -> None:
    r = pi.compare(_fig(150, 10, 20), _fig(100, 20, 10))
    assert r == pytest.approx({"throughput": 1.5, "p50": 0.5, "p99": 2.0})


def test_explain_splits_the_throughput_ratio_into_model_and_serving() -> None:
    # ours: model 200/s, serves 100/s (keeps 50%); peer: model 100/s, serves 80/s (keeps 80%)
    lines = pi.explain(32, _fig(100, 10, 20), _fig(80, 10, 20), 200.0, 100.0, 32)
    assert "ratio 1.25x = model 2.00x (in-process, batch 32) x serving 0.62x" in lines[0]
    assert "keeps 50% of its model rate, the peer 80%" in lines[0]
    assert not any("behind" in line for line in lines)
    assert any("our serving path keeps less" in line for line in lines)


def test_explain_names_the_runtime_when_the_model_alone_is_slower() -> None:
    lines = pi.explain(1, _fig(50, 20, 30), _fig(100, 10, 15), 60.0, 150.0, 1)
    assert any("behind in throughput: the runtime" in line for line in lines)
    assert any("behind in p99 (2.00x): the tail follows the median" in line for line in lines)


def test_explain_names_the_serving_path_and_a_wider_tail() -> None:
    lines = pi.explain(32, _fig(80, 10, 50), _fig(100, 10, 20), 200.0, 100.0, 32)
    assert any("behind in throughput: the serving path" in line for line in lines)
    assert any("our tail is wider (p99/p50 5.00 vs 2.00)" in line for line in lines)
    assert not any("caution" in line for line in lines)


def test_explain_warns_when_a_server_beats_its_own_model() -> None:
    lines = pi.explain(1, _fig(100, 10, 20), _fig(100, 10, 20), 50.0, 200.0, 1)
    assert any("caution" in line for line in lines)


def test_format_table_has_a_header_and_one_aligned_line_per_row() -> None:
    rows = [{"clients": 1, "server": "ours", **_fig(123.456, 7.891, 12.5)}]
    header, line = pi.format_table(rows)
    assert header.split() == ["clients", "server", "items/s", "p50", "ms", "p99", "ms"]
    assert line.split() == ["1", "ours", "123.5", "7.89", "12.50"]
    assert len(header) == len(line)


def test_stage_breakdown_means_per_stage_and_items_per_run() -> None:
    delta = {
        "queue_sum": 0.2,
        "queue_count": 100,
        "preprocess_sum": 0.05,
        "preprocess_count": 10,
        "inference_sum": 0.4,
        "inference_count": 10,
        "Encode_sum": 1.0,
        "Encode_count": 100,
        "batch_sum": 100,
        "batch_count": 10,
    }
    out = pi.stage_breakdown(delta)
    assert out == pytest.approx(
        {"queue": 2.0, "preprocess": 5.0, "inference": 40.0, "other": -37.0, "items_per_run": 10}
    )
    assert pi.stage_breakdown({"queue_sum": 1.0, "queue_count": 1}) == {}


def test_a_venv_with_the_same_marker_is_reused_without_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / "imgtxt-peer.json").write_text(pi.json.dumps({"requirements": list(pi.PEER_REQUIREMENTS)}))
    monkeypatch.setattr(pi.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert pi.ensure_peer_venv(venv) == (venv / "bin" / "python", None)


def test_a_failed_install_exits_2_with_the_log_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(cmd: list[str], stdout: Any, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        stdout.write("ERROR: Could not find a version that satisfies the requirement infinity-emb\n")
        stdout.flush()
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(pi.subprocess, "run", fail)
    monkeypatch.setattr(pi, "load_bundle", lambda *a, **k: SimpleNamespace(manifest=SimpleNamespace(training={})))
    monkeypatch.setattr(pi, "_minilm_dir", lambda: tmp_path)
    argv = ["--bundle", str(tmp_path), "--peer-venv", str(tmp_path / "venv"), "--results", str(tmp_path / "r")]
    assert pi.main(argv) == 2
    err = capsys.readouterr().err
    assert "could not install infinity-emb[server,torch]==" in err and "Could not find a version" in err
    assert not (tmp_path / "r").exists()


def test_a_directory_that_is_not_a_venv_is_refused(tmp_path: Path) -> None:
    (tmp_path / "somefile").write_text("x")
    with pytest.raises(pi.PeerUnavailable, match="not a virtualenv"):
        pi.ensure_peer_venv(tmp_path)


def test_text_backbone_reads_the_grouped_config_as_the_trainer_saves_it() -> None:
    assert pi.text_backbone({"model": {"text_backbone": "tiny"}}) == "tiny"
    assert pi.text_backbone({"text_backbone": "tiny"}) == "tiny"  # older, flat configs
    assert pi.text_backbone({}) == "minilm"  # exported without a config: the default backbone


def test_the_same_weights_guard_fires_on_a_bundle_of_another_backbone(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def install(venv: Path) -> None:
        raise AssertionError("the guard let a bundle of another text backbone through to the peer install")

    monkeypatch.setattr(pi, "ensure_peer_venv", install)
    with pytest.raises(SystemExit) as exc:
        pi.main(["--bundle", str(tiny_bundle)])
    assert exc.value.code == 2
    assert "text backbone is 'tiny', not minilm: not the same weights as the peer" in capsys.readouterr().err


def test_stage_breakdown_spreads_the_queue_over_every_request_when_some_ran_alone() -> None:
    from benchmarks.server_metrics import stage_breakdown

    # 100 requests of 10 ms each: 90 ran alone (no queue), 10 waited 2 ms each
    delta = {"queue_sum": 0.02, "queue_count": 10, "inference_sum": 0.8, "inference_count": 100}
    delta |= {"Encode_sum": 1.0, "Encode_count": 100, "preprocess_sum": 0.0, "preprocess_count": 100}
    out = stage_breakdown(delta)
    assert out["queue"] == pytest.approx(0.2) and out["other"] == pytest.approx(10 - 0.2 - 8)
