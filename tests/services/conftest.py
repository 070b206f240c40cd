"""Fixtures of the service tests: encoders on the tiny bundle, real servers on 127.0.0.1 port 0, real clients."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from image_encoder_service.server import create_server as create_image_server
from imgtxt.client import ImageEncoderClient, TextEncoderClient
from imgtxt.encoders.image import ImageEncoder
from imgtxt.encoders.text import TextEncoder
from imgtxt.preprocess import ImageLimits
from imgtxt.serving.config import ServerConfig
from imgtxt.serving.server import EncoderServer
from text_encoder_service.server import create_server as create_text_server

# Small enough that an over-limit image is cheap to build, large enough for the test images.
TEST_IMAGE_LIMITS = ImageLimits(max_image_bytes=100_000, max_image_pixels=1_000_000)


def make_image(seed: int, size: tuple[int, int] = (48, 40), fmt: str = "JPEG") -> bytes:
    """A small random-noise image file."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


@contextmanager
def serving(
    create: Callable[[ServerConfig, Any], EncoderServer], encoder: Any, **config: Any
) -> Iterator[EncoderServer]:
    """A started, warmed-up server on 127.0.0.1 with a free port; stopped on exit."""
    server = create(ServerConfig(**{"host": "127.0.0.1", "port": 0, **config}), encoder)
    try:
        server.warm_up()
        yield server
    finally:
        server.stop(grace=0)


@pytest.fixture(scope="session")
def ort_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Optimised-model cache of the test session."""
    return tmp_path_factory.mktemp("ort-cache")


@pytest.fixture(scope="session")
def text_encoder(tiny_bundle: Path, ort_cache: Path) -> TextEncoder:
    """The tiny bundle's text tower on CPU."""
    return TextEncoder.from_bundle(tiny_bundle, device="cpu", intra_op_threads=1, cache_dir=ort_cache)


@pytest.fixture(scope="session")
def image_encoder(tiny_bundle: Path, ort_cache: Path) -> Iterator[ImageEncoder]:
    """The tiny bundle's image tower on CPU, with small image limits."""
    with ImageEncoder.from_bundle(
        tiny_bundle, device="cpu", intra_op_threads=1, cache_dir=ort_cache, limits=TEST_IMAGE_LIMITS
    ) as encoder:
        yield encoder


@pytest.fixture(scope="module")
def text_server(text_encoder: TextEncoder) -> Iterator[EncoderServer]:
    """A text server with default settings but a small max_batch."""
    with serving(create_text_server, text_encoder, max_batch=8, max_message_bytes=256 * 1024) as server:
        yield server


@pytest.fixture(scope="module")
def image_server(image_encoder: ImageEncoder) -> Iterator[EncoderServer]:
    """An image server with a small max_batch and message limit."""
    with serving(create_image_server, image_encoder, max_batch=8, max_message_bytes=512 * 1024) as server:
        yield server


@pytest.fixture
def text_client(text_server: EncoderServer) -> Iterator[TextEncoderClient]:
    """A client of `text_server` (allowed to send more than the server accepts)."""
    with TextEncoderClient(f"127.0.0.1:{text_server.port}", max_message_bytes=4 << 20, max_retries=0) as client:
        yield client


@pytest.fixture
def image_client(image_server: EncoderServer) -> Iterator[ImageEncoderClient]:
    """A client of `image_server` (allowed to send more than the server accepts)."""
    with ImageEncoderClient(f"127.0.0.1:{image_server.port}", max_message_bytes=4 << 20, max_retries=0) as client:
        yield client


def self_signed_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 made with the `openssl` CLI; returns (cert, key)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key
