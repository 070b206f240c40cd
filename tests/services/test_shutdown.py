"""Stopping a server loses no rpc: drain (NOT_SERVING, still answering), refuse new rpcs with UNAVAILABLE while
in-flight ones finish, end health watches, then gRPC's stop; and SIGTERM under load, end to end."""

from __future__ import annotations

import collections
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imgtxt.connection import RETRYABLE_CODES, ConnectionConfig
from imgtxt.encoders.text import TextEncoder
from imgtxt.serving.config import ServerConfig
from imgtxt.supervisor import run_services
from imgtxt.v1 import encoder_pb2 as pb
from imgtxt.v1 import encoder_pb2_grpc as pb_grpc
from tests.services.test_batching import GatedTextEncoder, _wait_until
from text_encoder_service.server import create_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RETRYABLE = {getattr(grpc.StatusCode, name) for name in RETRYABLE_CODES}
"""What the client's retry policy retries."""


def _request(text: str) -> pb.EncodeTextsRequest:
    return pb.EncodeTextsRequest(items=[pb.TextItem(text=text)])


def test_stop_refuses_new_rpcs_unavailable_while_in_flight_ones_finish(text_encoder: TextEncoder) -> None:
    encoder = GatedTextEncoder(text_encoder)
    server = create_server(ServerConfig(host="127.0.0.1", port=0, grace_s=30), encoder)
    stopper = threading.Thread(target=server.stop, name="stopper")
    try:
        server.warm_up()
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.TextEncoderStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            encoder.closed = True
            in_flight = stub.Encode.future(_request("admitted before the stop"), timeout=30)
            assert encoder.entered.wait(30)  # the rpc holds the session
            stopper.start()
            _wait_until(lambda: server.gate.closed)
            with pytest.raises(grpc.RpcError) as err:
                stub.Encode(_request("sent while stopping"), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == NOT_SERVING  # not refused
            encoder.gate.set()
            assert [r.code for r in in_flight.result().results] == [0]
        stopper.join(30)
        assert not stopper.is_alive()
    finally:
        encoder.gate.set()
        if not stopper.is_alive() and not server.gate.closed:
            server.stop(grace=0)
    unavailable = server.metrics.registry.get_sample_value(
        "imgtxt_encoder_errors_total", {"modality": "text", "method": "Encode", "code": "UNAVAILABLE"}
    )
    assert unavailable == 1.0


def test_open_health_watch_ends_at_stop_instead_of_holding_it(text_encoder: TextEncoder) -> None:
    # An open Watch is an rpc in flight: before, it held the server for the whole grace period and was cancelled.
    server = create_server(ServerConfig(host="127.0.0.1", port=0, grace_s=120), text_encoder)
    server.warm_up()
    stopper = threading.Thread(target=server.stop, name="stopper")
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(watch).status == SERVING
        stopper.start()
        assert [r.status for r in watch] == [NOT_SERVING]  # then the stream ends, OK
    stopper.join(30)
    assert not stopper.is_alive()


class _Tally:
    """Outcomes of the load's calls, by status code, and whether each came before or after SIGTERM."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.sent = 0
        self.codes: collections.Counter[tuple[grpc.StatusCode, bool]] = collections.Counter()
        self.details: dict[grpc.StatusCode, set[str]] = collections.defaultdict(set)
        self.signalled = False

    def record(self, code: grpc.StatusCode, details: str = "") -> None:
        with self.cond:
            self.codes[code, self.signalled] += 1
            if code != grpc.StatusCode.OK:
                self.details[code].add(details.split(";")[0][:80])
            self.cond.notify_all()

    def count(self, code: grpc.StatusCode | None = None) -> int:
        return sum(n for (c, _), n in self.codes.items() if code is None or c == code)


def test_sigterm_under_load_loses_no_unary_call(tiny_bundle: Path, ort_cache: Path) -> None:
    """8 client threads send unary Encode calls back to back (about 1,000/s here); SIGTERM lands in the middle.

    Every call must be answered, or refused with a code the client's retry policy retries; `lost` counts the rest.
    The clients keep sending through the whole stop (they do not watch health: a draining server still answers).
    gRPC's own stop cancels the calls it has accepted but not yet handed to a handler (grpc/grpc#41785): their
    CANCELLED is retried by the channel and ends as the stopped server's UNAVAILABLE.
    """
    flags = ("--device", "cpu", "--intra-op-threads", "1", "--cache-dir", str(ort_cache))
    flags += ("--drain-delay-s", "1", "--grace-s", "30")  # after start_service's own --drain-delay-s 0: last wins
    tally = _Tally()
    done = threading.Event()
    per_thread_limit = 20_000  # bounds each loop even if the server never stopped

    def load(target: str) -> None:
        with ConnectionConfig(target).channel() as channel:  # the clients' own channel: retries, keepalive
            encode = pb_grpc.TextEncoderStub(channel).Encode
            request = _request("a dog runs on the beach")
            for _ in range(per_thread_limit):
                if done.is_set():
                    return
                with tally.cond:
                    tally.sent += 1
                try:
                    encode(request, timeout=20)
                    tally.record(grpc.StatusCode.OK)
                except grpc.RpcError as err:
                    tally.record(err.code(), err.details() or "")

    with run_services(tiny_bundle, extra_args=flags, modalities=("text",)) as (svc,):
        threads = [threading.Thread(target=load, args=(svc.target,), name=f"load-{i}") for i in range(8)]
        start = time.monotonic()
        for t in threads:
            t.start()
        with tally.cond:
            assert tally.cond.wait_for(lambda: tally.count(grpc.StatusCode.OK) >= 2000, timeout=120)
            rate = tally.count(grpc.StatusCode.OK) / (time.monotonic() - start)
            tally.signalled = True
        signalled = time.monotonic()
        svc.process.send_signal(signal.SIGTERM)
        code = svc.process.wait(timeout=60)
        stop_s = time.monotonic() - signalled
        done.set()
        for t in threads:
            t.join(30)
    answered = tally.count(grpc.StatusCode.OK)
    refused = {c.name: tally.count(c) for c in RETRYABLE if tally.count(c)}
    lost = {c.name: n for (c, _), n in tally.codes.items() if c != grpc.StatusCode.OK and c not in RETRYABLE}
    figures = (
        f"{rate:.0f} calls/s; stopped {stop_s:.1f} s after SIGTERM; sent {tally.sent}, answered {answered} "
        f"({tally.codes[grpc.StatusCode.OK, True]} after SIGTERM), refused {refused}, lost {lost}; "
        f"details {dict(tally.details)}"
    )
    assert code == 0, figures
    assert not any(t.is_alive() for t in threads)
    assert tally.sent == answered + sum(refused.values()) + sum(lost.values()), figures
    assert not lost, figures
    assert refused, figures  # SIGTERM did land while the clients were sending
    # Calls sent in the drain were answered: before, the clients' channels watched health and failed them
    # ("backend unhealthy") while the server still answered, so at most the 8 calls in flight got through.
    assert tally.codes[grpc.StatusCode.OK, True] > 16, figures
