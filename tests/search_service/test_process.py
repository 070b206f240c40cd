"""`imgtxt serve-search` as an operator runs it: the shell's signal handling and stop, over gRPC and HTTP."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imgtxt.v1 import search_pb2 as pb
from imgtxt.v1 import search_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]


def _start(index: tuple[Path, Path], services: tuple[str, str], port_file: Path, *extra: str) -> subprocess.Popen[str]:
    """`python -m search_service` over the test index; returns once it reported its ports."""
    args = ["--store", str(index[1]), "--collection", "search-test", "--image-service", services[0]]
    args += ["--text-service", services[1], "--host", "127.0.0.1", "--port", "0", "--http-port", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "search_service", *args, "--port-file", str(port_file), *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("listening on port "), proc.stderr.read() if proc.stderr else line
    return proc


def test_sigterm_drains_answering_both_protocols_and_a_second_one_exits_at_once(
    index: tuple[Path, Path], encoder_services: tuple[str, str], tmp_path: Path
) -> None:
    port_file = tmp_path / "ports"
    # A long drain: the test looks inside it, then signals again.
    proc = _start(index, encoder_services, port_file, "--drain-delay-s", "30", "--grace-s", "5")
    try:
        grpc_port, http_port = (int(p) for p in port_file.read_text().split())
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            proc.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING  # the drain has begun
            hits = pb_grpc.SearchServiceStub(channel).Search(pb.SearchRequest(text="photo 1", limit=2), timeout=30)
            assert len(hits.hits) == 2  # still answered in the drain
            request = urllib.request.Request(
                f"http://127.0.0.1:{http_port}/v1/search",
                data=json.dumps({"text": "photo 1", "limit": 2}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                assert len(json.loads(response.read())["hits"]) == 2
            proc.send_signal(signal.SIGTERM)  # a second signal: the operator does not want to wait
            assert proc.wait(timeout=60) == 1
        assert proc.stderr is not None
        log = proc.stderr.read()
        assert "received SIGTERM: shutting down" in log and "received SIGTERM again" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_stops_and_exits_0(index: tuple[Path, Path], encoder_services: tuple[str, str], tmp_path: Path) -> None:
    proc = _start(index, encoder_services, tmp_path / "ports", "--drain-delay-s", "0")
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
