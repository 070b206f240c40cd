"""The batching rule on fake hardware descriptions, the flags that override it, and what `Info` and the metrics say."""

from __future__ import annotations

import argparse
import logging

import pytest

from imgtxt.client import TextEncoderClient
from imgtxt.encoders.session import CPU, CUDA
from imgtxt.encoders.text import TextEncoder
from imgtxt.errors import ConfigError
from imgtxt.serving.config import add_server_flags, server_config_from_args
from imgtxt.serving.tuning import CPU_BATCH_WORKERS, Hardware, choose_batching, plan_batching
from tests.services.conftest import serving
from text_encoder_service.server import create_server


@pytest.mark.parametrize("tower", ["image", "text"])
@pytest.mark.parametrize("cores", [1, 2, 16])
def test_the_rule_runs_unbatched_on_a_cpu_with_a_core_left_for_requests(tower: str, cores: int) -> None:
    plan = choose_batching(Hardware(cores, CPU, tower))
    assert (plan.batching, plan.batch_workers, plan.intra_op_threads) == (False, 0, max(1, cores - 1))
    assert plan.mode == "off" and plan.source == "auto"
    assert f"{cores} core(s)" in plan.reason and tower in plan.reason


@pytest.mark.parametrize("tower", ["image", "text"])
def test_the_rule_keeps_batching_with_one_worker_on_cuda(tower: str) -> None:
    plan = choose_batching(Hardware(8, CUDA, tower))
    assert (plan.batching, plan.batch_workers, plan.intra_op_threads) == (True, 1, 8 // CPU_BATCH_WORKERS)
    assert CUDA in plan.reason


def test_flags_override_the_rule_and_say_so() -> None:
    cpu, gpu = Hardware(8, CPU, "text"), Hardware(8, CUDA, "text")
    on = plan_batching("on", cpu)
    assert (on.batching, on.batch_workers, on.intra_op_threads, on.source) == (True, 2, 4, "flag")
    assert on.reason.startswith("--batching on (flag; the rule would choose off")
    off = plan_batching("off", gpu)
    assert (off.batching, off.batch_workers, off.intra_op_threads, off.source) == (False, 0, 7, "flag")
    assert "the rule would choose on" in off.reason
    # explicit counts are kept; the other one fills the cores
    assert plan_batching("on", cpu, batch_workers=4).intra_op_threads == 2
    assert plan_batching("on", cpu, intra_op_threads=1).batch_workers == 8
    assert plan_batching("auto", cpu, intra_op_threads=3).intra_op_threads == 3
    assert plan_batching("auto", gpu, batch_workers=2).batch_workers == 2
    with pytest.raises(ConfigError, match=r"batching must be one of \('auto', 'on', 'off'\)"):
        plan_batching("yes", cpu)
    with pytest.raises(ConfigError, match="cores must be >= 1"):
        Hardware(0, CPU, "text")


def test_auto_is_the_default_flag() -> None:
    parser = argparse.ArgumentParser()
    add_server_flags(parser, "text")
    assert server_config_from_args(parser.parse_args(["--bundle", "b"])).batching == "auto"


def test_info_and_metrics_report_the_choice(text_encoder: TextEncoder, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="imgtxt.serving.tuning")
    with serving(create_server, text_encoder) as server:  # the default, --batching auto, on this CPU
        with TextEncoderClient(f"127.0.0.1:{server.port}") as client:
            info = client.info()
            assert client.encode(["a dog", "a cat"]).ok.all()
        assert (info.batching, info.batch_workers, info.intra_op_threads) == ("off", 0, text_encoder.intra_op_threads)
        assert info.batching_reason.startswith(f"{CPU} on ")
        assert (info.precision, info.precision_reason) == ("fp32", "--precision fp32 (flag)")
        assert server.runner.__class__.__name__ == "InlineRunner"
        labels = {"modality": "text", "bundle_version": info.bundle_version, "execution_provider": CPU}
        labels |= {"precision": "fp32", "precision_reason": info.precision_reason, "batching": "off"}
        assert server.metrics.registry.get_sample_value("imgtxt_encoder_info", labels) == 1.0
    assert any(r.levelno == logging.INFO and "batching off (automatic)" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with serving(create_server, text_encoder, batching="on", batch_workers=1) as server:
        with TextEncoderClient(f"127.0.0.1:{server.port}") as client:
            info = client.info()
        assert (info.batching, info.batch_workers) == ("on", 1)
        assert info.batching_reason.startswith("--batching on (flag; the rule would choose off")
    assert any(r.levelno == logging.WARNING and "set by flag" in r.getMessage() for r in caplog.records)
