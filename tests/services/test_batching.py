"""Dynamic batching over a real server: concurrent requests coalesce, batch workers run batches at the same time,
the queue is bounded, order is kept."""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

import imgtxt.serving.tuning as tuning_module
from imgtxt.client import TextEncoderClient
from imgtxt.encoders.session import CPU, CUDA
from imgtxt.encoders.text import TextEncoder
from imgtxt.serving.config import (
    ServerConfig,
    add_server_flags,
    server_config_from_args,
    session_config_from_args,
)
from imgtxt.serving.tuning import CPU_BATCH_WORKERS
from tests.services.conftest import serving
from text_encoder_service.server import create_server


class GatedTextEncoder(TextEncoder):
    """The real text encoder whose session runs wait for a gate once it is closed (to hold requests in the queue)."""

    def __init__(self, base: TextEncoder) -> None:
        super().__init__(base.bundle, base.session)
        self.closed = False
        self.entered = threading.Event()
        self.gate = threading.Event()

    def run(self, features: Sequence[np.ndarray]) -> np.ndarray:
        if self.closed:
            self.entered.set()
            self.gate.wait(30)
        return super().run(features)


def _wait_until(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Waits for a condition another thread makes true (polled: the batcher has no hook for tests)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.002)


def test_concurrent_requests_are_coalesced(text_encoder: TextEncoder) -> None:
    # A long delay and max_batch=4: the batch closes exactly when the 4th request arrives.
    with serving(create_server, text_encoder, batching="on", max_batch=4, max_delay_us=20_000_000) as server:
        target = f"127.0.0.1:{server.port}"
        with TextEncoderClient(target) as client, ThreadPoolExecutor(4) as pool:
            client.info()
            results = list(pool.map(lambda i: client.encode([f"caption {i}"]), range(4)))
        assert server.metrics.average_batch_size() == 4.0
        for i, r in enumerate(results):
            np.testing.assert_allclose(r.embeddings, text_encoder.encode([f"caption {i}"]).embeddings, atol=1e-5)


class PairedTextEncoder(TextEncoder):
    """The real text encoder whose session runs finish only once two of them are running at the same time."""

    def __init__(self, base: TextEncoder) -> None:
        super().__init__(base.bundle, base.session)
        self.armed = False
        self.pair = threading.Barrier(2, timeout=30)  # broken (a failed run) if no second run joins

    def run(self, features: Sequence[np.ndarray]) -> np.ndarray:
        if self.armed:
            self.pair.wait()
        return super().run(features)


def test_batch_workers_run_batches_at_the_same_time(text_encoder: TextEncoder) -> None:
    encoder = PairedTextEncoder(text_encoder)
    # max_batch=1: each request is a batch of its own, so the two requests are two session runs.
    with serving(create_server, encoder, batching="on", max_batch=1, max_delay_us=0, batch_workers=2) as server:
        assert server.runner.workers == 2  # type: ignore[attr-defined]
        with TextEncoderClient(f"127.0.0.1:{server.port}", max_retries=0) as client, ThreadPoolExecutor(2) as pool:
            client.info()
            encoder.armed = True
            results = list(pool.map(lambda i: client.encode([f"caption {i}"]), range(2)))
        encoder.armed = False
        assert not encoder.pair.broken
        for i, r in enumerate(results):
            np.testing.assert_allclose(r.embeddings, text_encoder.encode([f"caption {i}"]).embeddings, atol=1e-5)


def test_batch_workers_hand_each_request_its_own_rows(text_encoder: TextEncoder) -> None:
    texts = [f"a caption of {'many ' * (i % 5)}words number {i}" for i in range(24)]
    with (
        serving(create_server, text_encoder, batching="on", max_batch=4, batch_workers=3) as server,
        TextEncoderClient(f"127.0.0.1:{server.port}") as client,
        ThreadPoolExecutor(8) as pool,
    ):
        client.info()
        results = list(pool.map(lambda t: client.encode([t, t.upper()]), texts))
    for text, r in zip(texts, results, strict=True):
        np.testing.assert_allclose(r.embeddings, text_encoder.encode([text, text.upper()]).embeddings, atol=1e-5)


def test_batch_workers_and_threads_fill_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("IMGTXT_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(tuning_module, "available_cores", lambda: 8)
    parser = argparse.ArgumentParser()
    add_server_flags(parser, "text")

    def resolved(*flags: str, provider: str = CPU) -> tuple[int, int]:
        """(batch workers, intra-op threads per run) the flags give a session on `provider`, batching on."""
        args = parser.parse_args(["--bundle", "b", "--device", "cpu", "--batching", "on", *flags])
        threads = session_config_from_args(args).resolved_intra_op_threads
        return server_config_from_args(args).batching_plan(provider, "text", threads).batch_workers, threads

    assert resolved() == (CPU_BATCH_WORKERS, 8 // CPU_BATCH_WORKERS)
    assert resolved("--batch-workers", "1") == (1, 8)
    assert resolved("--batch-workers", "3") == (3, 2)
    assert resolved("--intra-op-threads", "8") == (1, 8)  # an explicit thread count: as many runs as fit
    assert resolved("--intra-op-threads", "2") == (4, 2)
    assert resolved("--batch-workers", "2", "--intra-op-threads", "8") == (2, 8)  # both explicit: as given
    assert resolved(provider=CUDA)[0] == 1  # one device: a second worker would only halve the batches
    assert ServerConfig(batching="on").batching_plan(CPU, "text").batch_workers == CPU_BATCH_WORKERS
    assert resolved("--batch-workers", "3", provider=CUDA)[0] == 3
    off = session_config_from_args(parser.parse_args(["--bundle", "b", "--batching", "off"]))
    assert off.resolved_intra_op_threads == 7  # each rpc runs its own session run; a core stays for the requests
    with pytest.raises(ValueError, match="batch_workers"):
        ServerConfig(batch_workers=-1)
    with pytest.raises(ValueError, match="batching must be one of"):
        ServerConfig(batching="sometimes")


def test_batching_off_runs_each_request_alone(text_encoder: TextEncoder) -> None:
    with serving(create_server, text_encoder, batching="off") as server:
        with TextEncoderClient(f"127.0.0.1:{server.port}") as client, ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: client.encode([f"caption {i}"]), range(8)))
        assert server.metrics.average_batch_size() == 1.0


def test_queue_overflow_is_resource_exhausted(text_encoder: TextEncoder) -> None:
    encoder = GatedTextEncoder(text_encoder)
    # One batch worker: the second request waits in the queue while the first holds the session.
    one_worker = {"batching": "on", "max_batch": 2, "max_queue": 2, "max_delay_us": 0, "batch_workers": 1}
    with serving(create_server, encoder, **one_worker) as server:
        with TextEncoderClient(f"127.0.0.1:{server.port}", max_retries=0) as client, ThreadPoolExecutor(2) as pool:
            client.info()
            encoder.closed = True
            running = pool.submit(client.encode, ["a", "b"])
            assert encoder.entered.wait(30)  # batch 1 holds the session
            queued = pool.submit(client.encode, ["c", "d"])
            _wait_until(lambda: server.runner.depth == 2)  # type: ignore[attr-defined]
            with pytest.raises(grpc.RpcError) as err:
                client.encode(["e"])
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_queue=2" in err.value.details()
            encoder.gate.set()
            assert running.result().ok.all() and queued.result().ok.all()
            assert client.encode(["f"]).ok.all()
        errors = server.metrics.registry.get_sample_value(
            "imgtxt_encoder_errors_total", {"modality": "text", "method": "Encode", "code": "RESOURCE_EXHAUSTED"}
        )
        assert errors == 1.0


def test_stream_waits_for_room_in_a_full_queue(text_encoder: TextEncoder) -> None:
    encoder = GatedTextEncoder(text_encoder)
    with (
        serving(
            create_server, encoder, batching="on", max_batch=2, max_queue=2, max_delay_us=0, batch_workers=1
        ) as server,
        TextEncoderClient(f"127.0.0.1:{server.port}", max_retries=0) as client,
        ThreadPoolExecutor(3) as pool,
    ):
        client.info()
        encoder.closed = True
        running = pool.submit(client.encode, ["a", "b"])
        assert encoder.entered.wait(30)
        queued = pool.submit(client.encode, ["c", "d"])
        _wait_until(lambda: server.runner.depth == 2)  # type: ignore[attr-defined]
        stream = pool.submit(lambda: list(client.encode_stream(["e", "f", "g"], chunk_size=1)))
        _wait_until(lambda: server.runner.waiting == 1)  # type: ignore[attr-defined]  # blocked, not failed
        encoder.gate.set()
        assert running.result().ok.all() and queued.result().ok.all()
        chunks = stream.result()
        assert [len(c) for c in chunks] == [1, 1, 1] and all(c.ok.all() for c in chunks)


class BrokenTextEncoder(TextEncoder):
    """The real text encoder whose next session run fails with an unexpected error."""

    def __init__(self, base: TextEncoder) -> None:
        super().__init__(base.bundle, base.session)
        self.fail_next = False

    def run(self, features: Sequence[np.ndarray]) -> np.ndarray:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("secret internal detail")
        return super().run(features)


def test_unexpected_error_is_internal_and_logged(text_encoder: TextEncoder, caplog: pytest.LogCaptureFixture) -> None:
    encoder = BrokenTextEncoder(text_encoder)
    with (
        serving(create_server, encoder) as server,
        TextEncoderClient(f"127.0.0.1:{server.port}", max_retries=0) as client,
    ):
        client.info()
        encoder.fail_next = True
        with pytest.raises(grpc.RpcError) as err:
            client.encode(["a dog"])
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in err.value.details()
        assert client.encode(["a dog"]).ok.all()  # still serving
    logged = [r for r in caplog.records if r.levelname == "ERROR" and r.exc_info]
    assert logged and "secret internal detail" in str(logged[0].exc_info[1])  # type: ignore[index]
