"""Operations: health transitions, reflection, metrics endpoint, bearer-token auth, TLS."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from imgtxt.client import TextEncoderClient
from imgtxt.encoders.text import TextEncoder
from imgtxt.serving.config import ServerConfig
from imgtxt.serving.server import EncoderServer
from imgtxt.v1 import encoder_pb2 as pb
from imgtxt.v1 import encoder_pb2_grpc as pb_grpc
from tests.services.conftest import self_signed_cert, serving
from text_encoder_service.server import SERVICE_NAME, create_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _health(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status)


def test_health_not_serving_until_warm_then_serving_then_draining(text_encoder: TextEncoder) -> None:
    server = create_server(ServerConfig(host="127.0.0.1", port=0), text_encoder)
    try:
        assert _health(server.port) == NOT_SERVING
        assert _health(server.port, SERVICE_NAME) == NOT_SERVING
        server.warm_up()
        assert _health(server.port) == SERVING
        assert _health(server.port, SERVICE_NAME) == SERVING
        server.drain()
        assert _health(server.port, SERVICE_NAME) == NOT_SERVING
        # While draining, rpcs are still answered (a caller that ignores health still gets through) ...
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            request = pb.EncodeTextsRequest(items=[pb.TextItem(text="still answered while draining")])
            assert pb_grpc.TextEncoderStub(channel).Encode(request, timeout=10).results[0].code == 0
        # ... the project's own client included: before, its channel watched health and failed the call with
        # "backend unhealthy" while the server still answered it.
        with TextEncoderClient(f"127.0.0.1:{server.port}", max_retries=0, timeout=5) as client:
            assert client.encode(["sent to a draining server"]).ok.all()
    finally:
        server.stop(grace=0)


def test_reflection_lists_the_services(text_server: EncoderServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{text_server.port}") as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {"imgtxt.v1.TextEncoder", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(
        services
    )


def test_metrics_endpoint(text_encoder: TextEncoder) -> None:
    # batching on: the queue stage is observed only where requests queue
    with serving(create_server, text_encoder, batching="on", metrics_port=0, metrics_host="127.0.0.1") as server:
        with TextEncoderClient(f"127.0.0.1:{server.port}") as client:
            client.encode(["a dog", ""])
        assert server.metrics_port
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    assert 'imgtxt_encoder_requests_total{method="Encode",modality="text"} 1.0' in body
    assert 'imgtxt_encoder_items_total{code="3",modality="text"} 1.0' in body
    assert 'execution_provider="CPUExecutionProvider"' in body
    for stage in ("queue", "preprocess", "inference"):
        assert f'imgtxt_encoder_stage_seconds_count{{modality="text",stage="{stage}"}}' in body
    assert "imgtxt_encoder_batch_size_average" in body and "imgtxt_encoder_queue_depth" in body


def test_metrics_bind_loopback_by_default_and_need_the_token(text_encoder: TextEncoder) -> None:
    assert ServerConfig().metrics_host == "127.0.0.1"  # before: 0.0.0.0, every address, no auth
    with serving(create_server, text_encoder, metrics_port=0, auth_token="s3cret") as server:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        for header in (None, "Bearer wrong"):
            request = urllib.request.Request(url, headers={"Authorization": header} if header else {})
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(request, timeout=10)
            assert err.value.code == 401
        request = urllib.request.Request(url, headers={"Authorization": "Bearer s3cret"})
        assert b"imgtxt_encoder_requests" in urllib.request.urlopen(request, timeout=10).read()


def test_a_malformed_request_without_a_token_is_unauthenticated_first(text_encoder: TextEncoder) -> None:
    # Before, the request check ran before auth: a caller without the token learnt INVALID_ARGUMENT (and why).
    with (
        serving(create_server, text_encoder, auth_token="s3cret") as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        raw = channel.unary_unary(f"/{SERVICE_NAME}/Encode")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\x0a\x05\xff\xff", timeout=10)  # items[0] is 5 bytes long but 2 are sent
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\x0a\x05\xff\xff", timeout=10, metadata=(("authorization", "Bearer s3cret"),))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_bearer_token_auth(text_encoder: TextEncoder) -> None:
    with serving(create_server, text_encoder, auth_token="s3cret") as server:
        target = f"127.0.0.1:{server.port}"
        for token in (None, "wrong"):
            with TextEncoderClient(target, token=token, max_retries=0) as client:
                with pytest.raises(grpc.RpcError) as err:
                    client.info()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as err:
                    list(client._stub.EncodeStream(iter([]), timeout=10))
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _health(server.port) == SERVING  # health is exempt
        with TextEncoderClient(target, token="s3cret") as client:
            assert client.encode(["a dog"]).ok.all()
            assert len(list(client.encode_stream(["a", "b", "c"], chunk_size=2))) == 2


def test_tls(text_encoder: TextEncoder, tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path, "server")
    other_cert, _ = self_signed_cert(tmp_path, "other")
    with serving(create_server, text_encoder, tls_cert=cert, tls_key=key) as server:
        target = f"127.0.0.1:{server.port}"
        with TextEncoderClient(target, tls_ca=cert) as client:
            assert client.encode(["over tls"]).ok.all()
            assert client.info().dim == 32
        for wrong in (
            TextEncoderClient(target, tls_ca=other_cert, max_retries=0, timeout=10),
            TextEncoderClient(target, max_retries=0, timeout=10),  # plaintext against TLS
        ):
            with wrong, pytest.raises(grpc.RpcError) as err:
                wrong.info()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_reports_unavailable_after_retries() -> None:
    with TextEncoderClient("127.0.0.1:1", max_retries=1, timeout=5) as client, pytest.raises(grpc.RpcError) as err:
        client.info()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_server_config_validation() -> None:
    with pytest.raises(ValueError, match="max_queue"):
        ServerConfig(max_batch=64, max_queue=8)
    with pytest.raises(ValueError, match="together"):
        ServerConfig(tls_cert=Path("a.pem"))
