"""One end-to-end check on real-size towers (pretrained backbones): both services equal in-process encoding."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from image_encoder_service.server import create_server as create_image_server
from imgtxt.client import ImageEncoderClient, TextEncoderClient
from imgtxt.encoders.image import ImageEncoder
from imgtxt.encoders.text import TextEncoder
from tests.services.conftest import make_image, serving
from text_encoder_service.server import create_server as create_text_server


@pytest.fixture(scope="module")
def pretrained_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`IMGTXT_TEST_BUNDLE` when set, else the default towers (pretrained backbones, untrained heads) exported here."""
    if os.environ.get("IMGTXT_TEST_BUNDLE"):
        return Path(os.environ["IMGTXT_TEST_BUNDLE"])
    try:
        from trainer.export import export_model
        from trainer.model import DualEncoder, ModelSpec

        model = DualEncoder(ModelSpec(with_unit=False))
    except (ImportError, OSError) as exc:
        pytest.skip(f"no pretrained backbones available: {exc}")
    out = tmp_path_factory.mktemp("pretrained") / "bundle"
    return export_model(model, out, version="pretrained-backbones-test").path


@pytest.mark.slow
def test_pretrained_towers_through_the_services(pretrained_bundle: Path, tmp_path: Path) -> None:
    images = [make_image(i, size=(320, 240)) for i in range(4)]
    texts = ["a dog runs on the beach", "two children play in the snow", "a man rides a bicycle"]
    with ImageEncoder.from_bundle(pretrained_bundle, device="cpu", cache_dir=tmp_path) as image_encoder:
        local = image_encoder.encode(images).embeddings
        with (
            serving(create_image_server, image_encoder) as server,
            ImageEncoderClient(f"127.0.0.1:{server.port}") as client,
        ):
            remote = client.encode(images).embeddings
        np.testing.assert_allclose(remote, local, atol=1e-4)
    text_encoder = TextEncoder.from_bundle(pretrained_bundle, device="cpu", cache_dir=tmp_path)
    local = text_encoder.encode(texts).embeddings
    with serving(create_text_server, text_encoder) as server, TextEncoderClient(f"127.0.0.1:{server.port}") as client:
        remote = client.encode(texts).embeddings
        streamed = np.concatenate([r.embeddings for r in client.encode_stream(texts, chunk_size=2)])
    np.testing.assert_allclose(remote, local, atol=1e-4)
    np.testing.assert_allclose(streamed, local, atol=1e-4)
    assert local.shape[1] == remote.shape[1] > 32
