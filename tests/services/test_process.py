"""The service as an operator runs it: a subprocess configured by flags and IMGTXT_* variables, stopped by SIGTERM."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import onnxruntime as ort
import pytest

from imgtxt.bundle import load_bundle
from imgtxt.encoders.session import CUDA
from imgtxt.v1 import encoder_pb2 as pb
from imgtxt.v1 import encoder_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]


def _start(bundle: Path, cache: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    args = ["--bundle", str(bundle), "--host", "127.0.0.1", "--port", "0", "--cache-dir", str(cache), *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "text_encoder_service", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_sigterm_finishes_in_flight_stream_and_exits_0(tiny_bundle: Path, ort_cache: Path, tmp_path: Path) -> None:
    port_file, metrics_file = tmp_path / "port", tmp_path / "metrics-port"
    flags = ("--device", "cpu", "--grace-s", "60", "--port-file", str(port_file))
    flags += ("--metrics-port", "0", "--metrics-port-file", str(metrics_file))
    proc = _start(tiny_bundle, ort_cache, *flags, env={"IMGTXT_MAX_BATCH": "5"})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once the server is SERVING
        assert line.startswith("listening on port "), proc.stderr.read() if proc.stderr else line
        port = int(line.split()[-1])
        assert int(port_file.read_text()) == port
        # --metrics-port 0 reports the port it bound (before: only the free port's number was never told).
        metrics_port = int(proc.stdout.readline().removeprefix("metrics on port "))
        assert int(metrics_file.read_text()) == metrics_port
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as scrape:
            assert b"imgtxt_encoder_requests" in scrape.read()
        chunks: queue.Queue[pb.EncodeTextsRequest | None] = queue.Queue()

        def requests() -> Iterator[pb.EncodeTextsRequest]:
            while (chunk := chunks.get()) is not None:
                yield chunk

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TextEncoderStub(channel)
            assert stub.Info(pb.InfoRequest(), timeout=10).limits.max_batch == 5  # from IMGTXT_MAX_BATCH
            responses = stub.EncodeStream(requests(), timeout=60)
            chunks.put(pb.EncodeTextsRequest(items=[pb.TextItem(text="first chunk")]))
            assert len(next(responses).results) == 1  # the stream is in flight
            proc.send_signal(signal.SIGTERM)
            chunks.put(pb.EncodeTextsRequest(items=[pb.TextItem(text="sent after"), pb.TextItem(text="SIGTERM")]))
            second = next(responses)
            assert [r.code for r in second.results] == [0, 0]
            chunks.put(None)
            assert list(responses) == []
        assert proc.wait(timeout=60) == 0
        assert proc.stderr is not None and "received SIGTERM" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_device_cuda_refuses_to_start_without_cuda(tiny_bundle: Path, ort_cache: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    probe = ort.InferenceSession(str(bundle.file(bundle.manifest.text.file)), providers=[CUDA, "CPUExecutionProvider"])
    if probe.get_providers()[0] == CUDA:
        pytest.skip("CUDA is usable here")
    proc = _start(tiny_bundle, ort_cache, env={"IMGTXT_DEVICE": "cuda"})
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "error: --device cuda" in err
