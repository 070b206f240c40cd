"""The image service against bad input, over a real server and client; the server keeps serving afterwards."""

from __future__ import annotations

import struct
import zlib

import grpc
import numpy as np
import pytest

from imgtxt.client import ImageEncoderClient
from imgtxt.encoders.image import ImageEncoder
from imgtxt.encoders.types import ItemCode
from imgtxt.serving.server import EncoderServer
from imgtxt.v1 import encoder_pb2 as pb
from imgtxt.v1 import encoder_pb2_grpc as pb_grpc
from tests.services.conftest import make_image


def _png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A few hundred bytes of PNG whose header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def test_service_equals_in_process(image_client: ImageEncoderClient, image_encoder: ImageEncoder) -> None:
    images = [make_image(i) for i in range(5)] + [make_image(9, fmt="PNG")]
    remote = image_client.encode(images)
    local = image_encoder.encode(images)
    np.testing.assert_allclose(remote.embeddings, local.embeddings, atol=1e-5)
    assert remote.embeddings.dtype == np.float32 and remote.embeddings.shape == (6, 32)


def test_each_bad_image_fails_alone(image_client: ImageEncoderClient, image_encoder: ImageEncoder) -> None:
    good = make_image(1)
    big = make_image(2, size=(400, 400), fmt="PNG")  # random noise does not compress: > 100 kB
    assert len(big) > 100_000
    items = [good, good[:200], b"\x89PNG\r\n\x1a\n" + b"\x13" * 300, b"plain text, not an image", b"", big, _png_bomb()]
    result = image_client.encode(items)
    codes = [o.code for o in result.outcomes]
    assert codes == [
        ItemCode.OK,
        ItemCode.INVALID_ARGUMENT,  # truncated
        ItemCode.INVALID_ARGUMENT,  # corrupt
        ItemCode.INVALID_ARGUMENT,  # not an image
        ItemCode.INVALID_ARGUMENT,  # zero bytes
        ItemCode.RESOURCE_EXHAUSTED,  # over max_image_bytes
        ItemCode.RESOURCE_EXHAUSTED,  # decompression bomb
    ]
    corrupt = "item 2: PNG image data (308 bytes) is corrupt: the chunk at byte offset 8 has an invalid type"
    assert result.outcomes[2].message.startswith(corrupt)
    assert "item 4" in result.outcomes[4].message and "empty" in result.outcomes[4].message
    assert "item 5" in result.outcomes[5].message and "max_image_bytes=100000" in result.outcomes[5].message
    assert "item 6" in result.outcomes[6].message and "max_image_pixels=1000000" in result.outcomes[6].message
    assert all(o.message.startswith(f"item {i}:") for i, o in enumerate(result.outcomes) if not o.ok)
    np.testing.assert_allclose(result.embeddings[0], image_encoder.encode([good]).embeddings[0], atol=1e-5)
    assert not result.embeddings[1:].any()
    assert image_client.encode([good]).outcomes[0].ok  # still serving


def test_batch_over_max_batch_is_invalid_argument(image_server: EncoderServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{image_server.port}") as channel:
        stub = pb_grpc.ImageEncoderStub(channel)
        request = pb.EncodeImagesRequest(items=[pb.ImageItem(data=make_image(0))] * 9)
        with pytest.raises(grpc.RpcError) as err:
            stub.Encode(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_batch=8" in err.value.details()


def test_message_over_size_limit_is_resource_exhausted(image_client: ImageEncoderClient) -> None:
    with pytest.raises(grpc.RpcError) as err:
        image_client.encode([b"\xff" * (600 * 1024)])
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert image_client.encode([make_image(3)]).outcomes[0].ok


def test_client_splits_large_inputs_into_server_batches(image_client: ImageEncoderClient) -> None:
    images = [make_image(i) for i in range(19)]
    result = image_client.encode(images)
    assert len(result) == 19 and result.ok.all()


def test_info(image_client: ImageEncoderClient) -> None:
    info = image_client.info()
    assert info.modality == "image" and info.dim == 32 and info.execution_provider == "CPUExecutionProvider"
    assert info.limits.max_batch == 8 and info.limits.max_image_bytes == 100_000
    assert info.limits.max_message_bytes == 512 * 1024
