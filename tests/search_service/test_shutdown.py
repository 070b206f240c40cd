"""The search service stops in the shell's four steps on both protocols: drain (NOT_SERVING, `/readyz` 503, still
answering), refuse (gRPC UNAVAILABLE, HTTP 503), grace, close; health Watch streams end; no call is lost under load."""

from __future__ import annotations

import collections
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imgtxt.connection import RETRYABLE_CODES, ConnectionConfig
from imgtxt.v1 import search_pb2 as pb
from imgtxt.v1 import search_pb2_grpc as pb_grpc
from search_service.server import SERVICE_NAME, SearchServer
from tests.search_service.conftest import _serve
from tests.search_service.test_service import _http, _stub

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RETRYABLE = {getattr(grpc.StatusCode, name).name for name in RETRYABLE_CODES} | {"HTTP 503", "refused", "reset"}
"""gRPC codes the clients retry, HTTP 503 (Retry-After), a refused connection and one reset before the server read the
request: what a stopped server may say."""


@pytest.fixture()
def stoppable(index: tuple[Path, Path], encoder_services: tuple[str, str]) -> Iterator[SearchServer]:
    """A search service of its own (the test stops it), with a short drain."""
    yield from _serve(index, encoder_services, None, drain_delay_s=0.5, grace_s=30)


def test_drain_reports_not_serving_answers_both_protocols_then_watch_streams_end(stoppable: SearchServer) -> None:
    server = stoppable
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert next(watch).status == SERVING
        server.shell.drain()
        assert next(watch).status == NOT_SERVING
        status, body, _ = _http(server, "/readyz")
        assert status == 503 and json.loads(body)["status"] == "not ready"  # before: "ready" until the port closed
        assert _http(server, "/v1/search", {"text": "photo 1", "limit": 2})[0] == 200  # still answered
        assert len(_stub(server).Search(pb.SearchRequest(text="photo 1", limit=2), timeout=30).hits) == 2
        stopper = threading.Thread(target=server.stop, name="stopper")
        stopper.start()
        assert list(watch) == []  # the stream ends (OK) instead of holding the stop for the grace period
        stopper.join(60)
        assert not stopper.is_alive()
    with pytest.raises(grpc.RpcError) as err:
        _stub(server).Search(pb.SearchRequest(text="photo 1"), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


class _Tally:
    """Outcomes of the load's calls by protocol and outcome."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.outcomes: collections.Counter[tuple[str, str]] = collections.Counter()

    def record(self, protocol: str, outcome: str) -> None:
        with self.cond:
            self.outcomes[protocol, outcome] += 1
            self.cond.notify_all()

    def ok(self, protocol: str) -> int:
        return self.outcomes[protocol, "OK"]


def test_stop_under_load_loses_no_call_on_either_protocol(stoppable: SearchServer) -> None:
    """4 gRPC clients (the project's channel: retries) and 2 HTTP clients search back to back; the stop lands in the
    middle. Every call is answered, or refused with something a client retries; `lost` counts the rest."""
    server = stoppable
    tally = _Tally()
    done = threading.Event()
    limit = 5_000  # bounds each loop even if the server never stopped

    def grpc_load() -> None:
        with ConnectionConfig(f"127.0.0.1:{server.port}").channel() as channel:
            search = pb_grpc.SearchServiceStub(channel).Search
            for _ in range(limit):
                if done.is_set():
                    return
                try:
                    search(pb.SearchRequest(text="photo 3", limit=3), timeout=20)
                    tally.record("grpc", "OK")
                except grpc.RpcError as err:
                    tally.record("grpc", err.code().name)

    def http_load() -> None:
        body = json.dumps({"text": "photo 3", "limit": 3}).encode()
        for _ in range(limit):
            if done.is_set():
                return
            request = urllib.request.Request(
                f"http://127.0.0.1:{server.http_port}/v1/search",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=20) as response:
                    response.read()
                tally.record("http", "OK")
            except urllib.error.HTTPError as err:
                tally.record("http", f"HTTP {err.code}")
            except (urllib.error.URLError, ConnectionResetError) as err:
                # A reset or broken pipe: the connection sat in the kernel's accept queue when the listening socket
                # closed, so the server never read the request; a client retries it on a new connection, as it does
                # a refused one. urlopen wraps what sending raises in a URLError; a reset while waiting for the answer
                # (the request fitted in the send buffer) comes unwrapped.
                reason = err.reason if isinstance(err, urllib.error.URLError) else err
                reset = isinstance(reason, BrokenPipeError | ConnectionResetError)
                refused = isinstance(reason, ConnectionRefusedError)
                tally.record("http", "refused" if refused else "reset" if reset else f"error {reason!r}")

    threads = [threading.Thread(target=grpc_load, name=f"grpc-{i}") for i in range(4)]
    threads += [threading.Thread(target=http_load, name=f"http-{i}") for i in range(2)]
    for t in threads:
        t.start()
    try:
        with tally.cond:
            assert tally.cond.wait_for(lambda: tally.ok("grpc") >= 100 and tally.ok("http") >= 30, timeout=120)
            before = dict(tally.outcomes)
        server.stop()
    finally:
        done.set()
        for t in threads:
            t.join(60)
    outcomes = dict(tally.outcomes)
    lost = {key: n for key, n in outcomes.items() if key[1] != "OK" and key[1] not in RETRYABLE}
    figures = f"before the stop {before}; in all {outcomes}"
    assert not any(t.is_alive() for t in threads), figures
    assert not lost, figures
    assert any(key[1] != "OK" for key in outcomes), figures  # the stop did land while the clients were sending
    after = {p: tally.ok(p) - before.get((p, "OK"), 0) for p in ("grpc", "http")}
    assert all(after.values()), figures  # both protocols were still answered during the drain
