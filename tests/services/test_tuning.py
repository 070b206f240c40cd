"""The batching rule on fake hardware descriptions, the flags that override it, and what `Info` and the metrics say."""

from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from imgtxt.client import TextEncoderClient
from imgtxt.encoders.session import CPU, CUDA
from imgtxt.encoders.text import TextEncoder
from imgtxt.errors import ConfigError
from imgtxt.serving.batcher import DynamicBatcher
from imgtxt.serving.config import add_server_flags, server_config_from_args
from imgtxt.serving.prometheus import ServiceMetrics
from imgtxt.serving.tuning import CPU_BATCH_WORKERS, Hardware, choose_batching, plan_batching
from tests.services.conftest import serving
from tests.services.test_batching import _wait_until
from text_encoder_service.server import create_server


@pytest.mark.parametrize(("cores", "slots", "threads"), [(1, 1, 1), (2, 2, 1), (16, 2, 8)])
def test_the_rule_on_a_cpu_batches_only_the_text_requests_that_arrive_while_every_slot_is_busy(
    cores: int, slots: int, threads: int
) -> None:
    tower = "text"
    plan = choose_batching(Hardware(cores, CPU, tower))
    assert (plan.batching, plan.run_alone_when_idle) == (True, True)
    assert (plan.batch_workers, plan.intra_op_threads) == (slots, threads)
    assert plan.mode == "adaptive" and plan.source == "auto"
    assert f"{cores} core(s), {tower} tower" in plan.reason
    assert plan_batching("auto", Hardware(cores, CPU, tower)) == plan  # the flags' defaults give the rule's plan


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (16, 15)])
def test_the_rule_on_a_cpu_runs_each_image_request_alone(cores: int, threads: int) -> None:
    plan = choose_batching(Hardware(cores, CPU, "image"))
    assert (plan.batching, plan.run_alone_when_idle) == (False, False)
    assert (plan.batch_workers, plan.intra_op_threads) == (0, threads)
    assert plan.mode == "off" and plan.source == "auto"
    assert f"{cores} core(s), image tower" in plan.reason and "batches" in plan.reason
    assert plan_batching("auto", Hardware(cores, CPU, "image")) == plan


@pytest.mark.parametrize("tower", ["image", "text"])
def test_the_rule_keeps_batching_with_one_slot_on_cuda(tower: str) -> None:
    plan = choose_batching(Hardware(8, CUDA, tower))
    assert (plan.batching, plan.batch_workers, plan.intra_op_threads) == (True, 1, 8 // CPU_BATCH_WORKERS)
    assert plan.run_alone_when_idle and CUDA in plan.reason
    assert plan_batching("auto", Hardware(8, CUDA, tower)) == plan


def test_flags_override_the_rule_and_say_so() -> None:
    cpu, gpu = Hardware(8, CPU, "text"), Hardware(8, CUDA, "text")
    on = plan_batching("on", cpu)
    assert (on.batching, on.batch_workers, on.intra_op_threads, on.source) == (True, 2, 4, "flag")
    assert not on.run_alone_when_idle and on.mode == "on"
    assert on.reason.startswith("--batching on (flag; the rule would choose: CPUExecutionProvider on 8 core(s)")
    off = plan_batching("off", gpu)
    assert (off.batching, off.batch_workers, off.intra_op_threads, off.source) == (False, 0, 7, "flag")
    assert off.mode == "off" and "the rule would choose: CUDAExecutionProvider" in off.reason
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
        plan = server.batching
        assert plan is not None and plan.run_alone_when_idle
        assert (info.batching, info.batch_workers, info.intra_op_threads) == ("adaptive", plan.batch_workers, 1)
        assert info.batching_reason == plan.reason and info.batching_reason.startswith(f"{CPU} on ")
        assert (info.precision, info.precision_reason) == ("fp32", "--precision fp32 (flag)")
        labels = {"modality": "text", "bundle_version": info.bundle_version, "execution_provider": CPU}
        labels |= {"precision": "fp32", "precision_reason": info.precision_reason, "batching": "adaptive"}
        assert server.metrics.registry.get_sample_value("imgtxt_encoder_info", labels) == 1.0
    assert any(r.levelno == logging.INFO and "batching adaptive (automatic)" in r.getMessage() for r in caplog.records)
    caplog.clear()
    for mode in ("on", "off"):
        with serving(create_server, text_encoder, batching=mode, batch_workers=1) as server:
            with TextEncoderClient(f"127.0.0.1:{server.port}") as client:
                info = client.info()
            assert (info.batching, info.batch_workers) == (mode, 1 if mode == "on" else 0)
            assert info.batching_reason.startswith(f"--batching {mode} (flag; the rule would choose: ")
    flagged = [r for r in caplog.records if r.levelno == logging.WARNING and "set by flag" in r.getMessage()]
    assert len(flagged) == 2


class RecordingTextEncoder(TextEncoder):
    """The real text encoder that records each session run's thread and size, and holds runs while `hold` is set."""

    def __init__(self, base: TextEncoder) -> None:
        super().__init__(base.bundle, base.session)
        self.runs: list[tuple[str, int]] = []
        self.hold = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()

    def run(self, features: Sequence[np.ndarray]) -> np.ndarray:
        with self.lock:
            self.runs.append((threading.current_thread().name, len(features)))
        if self.hold.is_set():
            self.release.wait(30)
        return super().run(features)


def test_adaptive_batching_runs_a_lone_request_at_once_and_coalesces_under_load(text_encoder: TextEncoder) -> None:
    encoder = RecordingTextEncoder(text_encoder)
    # a long delay: a request that queued would wait for it (or for max_batch); one that runs alone does not
    with serving(create_server, encoder, max_batch=8, max_delay_us=20_000_000, batch_workers=2) as server:
        assert server.batching is not None and server.batching.run_alone_when_idle
        with TextEncoderClient(f"127.0.0.1:{server.port}", max_retries=0) as client, ThreadPoolExecutor(9) as pool:
            client.info()
            encoder.runs.clear()
            for i in range(3):  # one client: each request runs at once, in its rpc's thread
                assert client.encode([f"caption {i}"]).ok.all()
            assert [size for _, size in encoder.runs] == [1, 1, 1]
            assert all(name.startswith("grpc") for name, _ in encoder.runs)
            encoder.runs.clear()
            encoder.hold.set()
            busy = pool.submit(client.encode, ["busy"])  # the service is idle: it runs at once, and is held
            _wait_until(lambda: len(encoder.runs) == 1)
            # a run is in flight: these queue (a slot is free, but a batch closes at max_batch=8 or after the delay)
            queued = [pool.submit(client.encode, [f"queued {i}"]) for i in range(8)]
            _wait_until(lambda: len(encoder.runs) == 2)  # the 8th closed the batch, and the free slot runs it
            encoder.hold.clear()
            encoder.release.set()
            assert all(f.result().ok.all() for f in [busy, *queued])
    assert [size for _, size in encoder.runs] == [1, 8]
    assert encoder.runs[0][0].startswith("grpc") and encoder.runs[1][0].startswith("batcher")


def test_after_a_coalesced_run_a_lone_request_queues_once_then_runs_alone_again() -> None:
    runs: list[tuple[str, int]] = []
    hold, release = threading.Event(), threading.Event()

    def run(features: Sequence[object]) -> np.ndarray:
        runs.append((threading.current_thread().name, len(features)))
        if hold.is_set():
            release.wait(30)
        return np.zeros((len(features), 4), np.float32)

    batcher = DynamicBatcher(
        run, ServiceMetrics("text", 3), max_batch=3, max_delay_us=50_000, max_queue=64, workers=2,
        run_alone_when_idle=True,
    )  # fmt: skip
    try:
        hold.set()
        alone = threading.Thread(target=batcher.submit, args=(["a"],), name="caller-0")
        alone.start()
        _wait_until(lambda: len(runs) == 1)
        queued = [batcher.submit([f"q{i}"]) for i in range(3)]  # a run is in flight: coalesced, closed by size
        _wait_until(lambda: len(runs) == 2)
        hold.clear()
        release.set()
        alone.join(30)
        assert all(f.result(30).shape == (1, 4) for f in queued)
        assert batcher.submit(["after the burst"]).result(30).shape == (1, 4)  # queues: the load was not light
        assert batcher.submit(["lone again"]).result(30).shape == (1, 4)  # the last run held one request: alone
    finally:
        batcher.close()
    assert [size for _, size in runs] == [1, 3, 1, 1]
    threads = [name.split("-")[0] for name, _ in runs]
    assert threads == ["caller", "batcher", "batcher", threading.current_thread().name.split("-")[0]]


def test_adaptive_batching_queues_stream_chunks_so_their_reader_keeps_preprocessing(text_encoder: TextEncoder) -> None:
    encoder = RecordingTextEncoder(text_encoder)
    with (
        serving(create_server, encoder, max_batch=4, max_delay_us=0) as server,
        TextEncoderClient(f"127.0.0.1:{server.port}") as client,
    ):
        client.info()
        encoder.runs.clear()
        results = list(client.encode_stream([f"caption {i}" for i in range(8)], chunk_size=2))
    assert len(results) == 4 and all(r.ok.all() for r in results)
    assert encoder.runs and all(name.startswith("batcher") for name, _ in encoder.runs)
