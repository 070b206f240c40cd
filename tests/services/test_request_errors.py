"""Requests gRPC cannot parse, and errors after the client has gone: clear statuses, tracebacks only for bugs."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
import pytest

from image_encoder_service.server import create_server as create_image_server
from imgtxt.client import ImageEncoderClient, TextEncoderClient
from imgtxt.encoders.image import ImageEncoder
from imgtxt.encoders.text import TextEncoder
from imgtxt.serving.config import ServerConfig
from imgtxt.serving.server import EncoderServer, build_server
from imgtxt.v1 import encoder_pb2 as pb
from imgtxt.v1 import encoder_pb2_grpc as pb_grpc
from tests.services.conftest import make_image, serving
from tests.services.test_batching import _wait_until
from text_encoder_service.server import SERVICE_NAME
from text_encoder_service.servicer import TextEncoderServicer

TEXTS = pb.EncodeTextsRequest(items=[pb.TextItem(id=f"k{i}", text=f"caption {i}") for i in range(3)])


def _texts_with_bad_utf8(position: int) -> bytes:
    """An EncodeTextsRequest of 4 texts whose text `position` is bytes that are not UTF-8 (\\xff\\xfe)."""
    request = pb.EncodeTextsRequest(items=[pb.TextItem(id=f"k{i}", text=f"text {i} @@") for i in range(4)])
    data = request.SerializeToString()
    marker = f"text {position} @@".encode()
    assert data.count(marker) == 1
    return data.replace(marker, f"text {position} \xff\xfe".encode("latin-1"))


def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info or "deserializ" in r.getMessage().lower()]


@pytest.mark.parametrize(
    ("payload", "details"),
    [
        (
            b"\x0a\x05\x12",
            "request is not a valid imgtxt.v1.EncodeTextsRequest message: Wire format was corrupt",
        ),
        (
            _texts_with_bad_utf8(2),
            "request is not a valid imgtxt.v1.EncodeTextsRequest message: item 2: String field had bad UTF-8 "
            "(TextItem.id and .text must be valid UTF-8)",
        ),
    ],
    ids=["corrupt protobuf", "bad UTF-8 in item 2"],
)
def test_unparsable_request_is_invalid_argument_without_a_traceback(
    text_server: EncoderServer, caplog: pytest.LogCaptureFixture, payload: bytes, details: str
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{text_server.port}") as channel:
        raw = channel.unary_unary("/imgtxt.v1.TextEncoder/Encode", request_serializer=None)
        with pytest.raises(grpc.RpcError) as err:
            raw(payload, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == details
        ok = pb_grpc.TextEncoderStub(channel).Encode(TEXTS, timeout=10)  # still serving
        assert [r.code for r in ok.results] == [0, 0, 0]
    assert _tracebacks(caplog) == []


def test_unparsable_image_request_names_its_type(image_server: EncoderServer, caplog: pytest.LogCaptureFixture) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{image_server.port}") as channel:
        raw = channel.unary_unary("/imgtxt.v1.ImageEncoder/Encode", request_serializer=None)
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff\xff", timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("request is not a valid imgtxt.v1.EncodeImagesRequest message: ")
    assert _tracebacks(caplog) == []


def test_unparsable_stream_message_fails_the_stream_at_that_message(
    text_server: EncoderServer, caplog: pytest.LogCaptureFixture
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{text_server.port}") as channel:
        raw = channel.stream_stream("/imgtxt.v1.TextEncoder/EncodeStream", request_serializer=None)
        responses = raw(iter([TEXTS.SerializeToString(), _texts_with_bad_utf8(3)]), timeout=10)
        first = pb.EncodeResponse.FromString(next(responses))
        assert [r.id for r in first.results] == ["k0", "k1", "k2"]
        with pytest.raises(grpc.RpcError) as err:
            next(responses)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(
        "stream message 1: request is not a valid imgtxt.v1.EncodeTextsRequest message: item 3: String field had "
        "bad UTF-8"
    )
    assert _tracebacks(caplog) == []


class _FailingAfterGate(TextEncoder):
    """The real text encoder whose armed session run waits for a gate, then fails with a bug."""

    def __init__(self, base: TextEncoder) -> None:
        super().__init__(base.bundle, base.session)
        self.armed = False
        self.entered = threading.Event()
        self.gate = threading.Event()

    def run(self, features: Sequence[np.ndarray]) -> np.ndarray:
        if self.armed:
            self.entered.set()
            self.gate.wait(30)
            raise RuntimeError("bug found after the client left")
        return super().run(features)


class _WatchedServicer(TextEncoderServicer):
    """The text servicer, telling the test when an Encode rpc has ended (here: been cancelled by its client)."""

    ended = threading.Event()

    def Encode(self, request: Any, context: grpc.ServicerContext) -> pb.EncodeResponse:
        context.add_callback(self.ended.set)
        return super().Encode(request, context)


def test_bug_after_a_client_cancel_is_logged_and_counted_as_internal(
    text_encoder: TextEncoder, caplog: pytest.LogCaptureFixture
) -> None:
    encoder = _FailingAfterGate(text_encoder)
    server = build_server(
        ServerConfig(host="127.0.0.1", port=0),
        encoder,
        _WatchedServicer,
        pb_grpc.add_TextEncoderServicer_to_server,
        SERVICE_NAME,
    )
    try:
        server.warm_up()
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            encoder.armed = True
            call = pb_grpc.TextEncoderStub(channel).Encode.future(TEXTS, timeout=30)
            assert encoder.entered.wait(30)
            call.cancel()
            assert _WatchedServicer.ended.wait(30)  # the server knows the client is gone
            encoder.gate.set()

            def errors(code: str) -> float | None:
                return server.metrics.registry.get_sample_value(
                    "imgtxt_encoder_errors_total", {"modality": "text", "method": "Encode", "code": code}
                )

            _wait_until(lambda: errors("INTERNAL") is not None)
            assert errors("INTERNAL") == 1.0 and errors("CANCELLED") is None
    finally:
        encoder.gate.set()
        server.stop(grace=0)
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert [str(r.exc_info[1]) for r in logged] == ["bug found after the client left"]  # type: ignore[index]


def test_bad_image_messages_name_the_callers_item_and_the_accepted_formats(image_encoder: ImageEncoder) -> None:
    # max_batch=4: the client sends 3 requests; messages name items by their position in the whole input.
    with (
        serving(create_image_server, image_encoder, max_batch=4) as server,
        ImageEncoderClient(f"127.0.0.1:{server.port}", max_retries=0) as client,
    ):
        images = [make_image(i) for i in range(10)]
        images[1], images[9] = b"<html>404</html>", make_image(9)[:300]
        result = client.encode(images)
    bad = {i: o.message for i, o in enumerate(result.outcomes) if not o.ok}
    assert sorted(bad) == [1, 9]
    assert bad[1] == (
        "item 1: image data (16 bytes, starting b'<html>40') is not an image file in an accepted format "
        "(JPEG, PNG, WEBP, GIF)"
    )
    # A truncated JPEG is named with the segment it ends in (imgtxt/image_structure.py).
    assert bad[9].startswith("item 9: JPEG image data (300 bytes) is truncated: segment ")
    assert "but the file ends" in bad[9] and bad[9].endswith(", at byte 300")
    assert not any("BytesIO" in m or " at 0x" in m for m in bad.values())


def test_text_messages_name_the_callers_item_once(text_client: TextEncoderClient) -> None:
    # The server's max_batch is 8: items 2 and 9 travel in different requests; both fail in the tokenizer's
    # one-by-one retry, which numbers texts within its own group.
    texts = [f"caption {i}" for i in range(12)]
    texts[2], texts[9] = "\x00\x01", "\u200b"  # only characters the tokenizer drops
    result = text_client.encode(texts)
    bad = {i: o.message for i, o in enumerate(result.outcomes) if not o.ok}
    assert bad == {
        2: "item 2: text has no tokens besides the special ones",
        9: "item 9: text has no tokens besides the special ones",
    }
