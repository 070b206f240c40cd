"""The text service over a real server and client: parity, truncation, bad input, streaming order."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from imgtxt.client import TextEncoderClient
from imgtxt.encoders.text import TextEncoder
from imgtxt.encoders.types import ItemCode
from imgtxt.serving.server import EncoderServer
from imgtxt.v1 import encoder_pb2 as pb
from imgtxt.v1 import encoder_pb2_grpc as pb_grpc

CAPTIONS = [f"caption number {i}: a {'big ' * (i % 5)}dog runs after {i} red balls" for i in range(23)]


def test_service_equals_in_process(text_client: TextEncoderClient, text_encoder: TextEncoder) -> None:
    remote = text_client.encode(CAPTIONS[:8])
    local = text_encoder.encode(CAPTIONS[:8])
    np.testing.assert_allclose(remote.embeddings, local.embeddings, atol=1e-5)
    assert [o.num_tokens for o in remote.outcomes] == [o.num_tokens for o in local.outcomes]


def test_truncation_and_bad_texts(text_client: TextEncoderClient, text_encoder: TextEncoder) -> None:
    max_tokens = text_encoder.text_config.max_tokens
    too_many_chars = "x" * (text_encoder.text_config.max_text_chars + 1)
    result = text_client.encode(["a dog", "", "word " * (3 * max_tokens), too_many_chars, "a cat"])
    codes = [o.code for o in result.outcomes]
    assert codes == [ItemCode.OK, ItemCode.INVALID_ARGUMENT, ItemCode.OK, ItemCode.RESOURCE_EXHAUSTED, ItemCode.OK]
    assert result.outcomes[2].truncated and result.outcomes[2].num_tokens == max_tokens
    assert "item 1" in result.outcomes[1].message
    assert "item 3" in result.outcomes[3].message and "max_text_chars=" in result.outcomes[3].message
    assert not result.embeddings[1].any() and not result.embeddings[3].any()
    np.testing.assert_allclose(result.embeddings[4], text_encoder.encode(["a cat"]).embeddings[0], atol=1e-5)


def test_ids_are_echoed_and_batch_limit_named(text_server: EncoderServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{text_server.port}") as channel:
        stub = pb_grpc.TextEncoderStub(channel)
        response = stub.Encode(pb.EncodeTextsRequest(items=[pb.TextItem(id="k1", text="a"), pb.TextItem(id="k2")]))
        assert [r.id for r in response.results] == ["k1", "k2"] and response.bundle_version == "tiny-d32-s0"
        with pytest.raises(grpc.RpcError) as err:
            stub.Encode(pb.EncodeTextsRequest(items=[pb.TextItem(text="a")] * 9), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_batch=8" in err.value.details()


def test_message_over_size_limit_is_resource_exhausted(text_client: TextEncoderClient) -> None:
    with pytest.raises(grpc.RpcError) as err:
        text_client.encode(["word " * 60_000])  # 300 kB > the server's 256 kB
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert text_client.encode(["still serving"]).ok.all()


def test_stream_returns_chunks_in_order(text_client: TextEncoderClient, text_encoder: TextEncoder) -> None:
    texts = [*CAPTIONS, "", *CAPTIONS[:5]]
    chunks = list(text_client.encode_stream(iter(texts), chunk_size=3))
    assert [len(c) for c in chunks] == [3] * 9 + [2]
    joined = np.concatenate([c.embeddings for c in chunks])
    expected = np.concatenate([text_encoder.encode(texts[i : i + 3]).embeddings for i in range(0, len(texts), 3)])
    np.testing.assert_allclose(joined, expected, atol=1e-5)
    assert chunks[7].outcomes[2].code == ItemCode.INVALID_ARGUMENT  # the empty text, position 23
    assert chunks[7].outcomes[2].message.startswith("item 23:")


def test_stream_of_nothing(text_client: TextEncoderClient) -> None:
    assert list(text_client.encode_stream([])) == []


def test_stream_chunk_over_max_batch_fails_the_stream(text_server: EncoderServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{text_server.port}") as channel:
        stub = pb_grpc.TextEncoderStub(channel)
        chunks = [
            pb.EncodeTextsRequest(items=[pb.TextItem(text="ok")]),
            pb.EncodeTextsRequest(items=[pb.TextItem()] * 9),
        ]
        responses = stub.EncodeStream(iter(chunks), timeout=10)
        assert [r.code for r in next(responses).results] == [0]
        with pytest.raises(grpc.RpcError) as err:
            next(responses)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_batch=8" in err.value.details()
