"""One connection config for every client path: TLS, token, deadline and gRPC's own retry policy."""

from __future__ import annotations

import json
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from imgtxt.client import TextEncoderClient
from imgtxt.connection import ConnectionConfig, is_loopback
from imgtxt.errors import ConfigError
from imgtxt.v1 import encoder_pb2 as pb


def test_token_never_travels_in_plaintext_off_this_machine() -> None:
    assert is_loopback("127.0.0.1:50051") and is_loopback("localhost:1") and is_loopback("[::1]:5")
    assert not is_loopback("10.0.0.7:50051") and not is_loopback("encoder.example:443")
    ConnectionConfig("127.0.0.1:50052", token="t")  # loopback: fine
    ConnectionConfig("encoder.example:443", token="t", tls=True)  # TLS: fine
    with pytest.raises(ConfigError, match=r"plaintext.*--tls-ca"):
        ConnectionConfig("encoder.example:443", token="t")


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ConfigError, match="host:port"):
        ConnectionConfig("localhost")
    with pytest.raises(ConfigError, match="together"):
        ConnectionConfig("localhost:1", tls_cert=Path("c.pem"))
    with pytest.raises(ConfigError, match=r"retries must be in 0\.\.4"):
        ConnectionConfig("localhost:1", retries=5)


def test_retry_policy_is_grpcs_own() -> None:
    policy = json.loads(ConnectionConfig("localhost:1", retries=3).service_config())["methodConfig"][0]
    services = {n["service"] for n in policy["name"]}
    assert services == {"imgtxt.v1.ImageEncoder", "imgtxt.v1.TextEncoder", "imgtxt.v1.SearchService"}
    assert policy["retryPolicy"]["maxAttempts"] == 4
    # CANCELLED from a stopping server (grpc/grpc#41785) is retried like UNAVAILABLE.
    assert policy["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED"]
    assert (
        "retryPolicy" not in json.loads(ConnectionConfig("localhost:1", retries=0).service_config())["methodConfig"][0]
    )


class _Flaky:
    """An Info handler that answers UNAVAILABLE `fail` times (a server restarting or draining), then succeeds."""

    def __init__(self, fail: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.fail, self.code, self.calls = fail, code, 0
        self.lock = threading.Lock()

    def __call__(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        with self.lock:
            self.calls += 1
            if self.calls <= self.fail:
                context.abort(self.code, "not now")
        return pb.InfoResponse(modality="text", dim=4)


def _serve(handler: _Flaky) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    method = grpc.unary_unary_rpc_method_handler(
        handler, request_deserializer=pb.InfoRequest.FromString, response_serializer=pb.InfoResponse.SerializeToString
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("imgtxt.v1.TextEncoder", {"Info": method})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED]
)
def test_retryable_codes_are_retried_by_the_channel(code: grpc.StatusCode) -> None:
    handler = _Flaky(fail=2, code=code)
    server, port = _serve(handler)
    try:
        with TextEncoderClient(f"127.0.0.1:{port}", max_retries=3, timeout=20) as client:
            assert client.info().dim == 4
        assert handler.calls == 3
    finally:
        server.stop(0)


def test_other_codes_and_exhausted_retries_surface() -> None:
    handler = _Flaky(fail=1, code=grpc.StatusCode.INVALID_ARGUMENT)
    server, port = _serve(handler)
    try:
        with TextEncoderClient(f"127.0.0.1:{port}", max_retries=3) as client, pytest.raises(grpc.RpcError) as err:
            client.info()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and handler.calls == 1  # a bug is not retried
        flaky = _Flaky(fail=10)
        server2, port2 = _serve(flaky)
        try:
            with TextEncoderClient(f"127.0.0.1:{port2}", max_retries=2) as client, pytest.raises(grpc.RpcError) as err:
                client.info()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and flaky.calls == 3
        finally:
            server2.stop(0)
    finally:
        server.stop(0)
