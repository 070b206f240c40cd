"""Shared fixtures: the tiny bundle (real exporter) and its towers in-process, tiny on-disk datasets, real Flickr8k."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgtxt.bundle import load_bundle
from imgtxt.datasets import default_data_root
from imgtxt.encoders.bundle import BundleEncoder
from imgtxt.encoders.session import SessionConfig


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete model bundle (image, text and unit ONNX graphs) of tiny random-weight towers, exported once."""
    from trainer.testing import export_tiny_bundle

    return export_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny", dim=32, seed=0)


@pytest.fixture(scope="session")
def flickr8k() -> Path:
    """The real Flickr8k data beside the repository; tests that need it skip cleanly when it is absent."""
    root = default_data_root()
    if not (root / "dataset_flickr8k.json").is_file():
        pytest.skip(f"Flickr8k data not found at {root} (set IMGTXT_DATA)")
    return root


def make_dataset(root: Path, n_images: int, captions: int = 2, missing: int = 0, seed: int = 0) -> Path:
    """Writes a Karpathy-style dataset (`dataset_test.json` + `images/`) of random images; all in split `val`.

    `missing` extra records name image files that do not exist (they must be rejected, not crash the job).
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n_images + missing):
        name = f"img{i:04d}.jpg"
        if i < n_images:
            pixels = rng.integers(0, 256, (24 + i % 5, 28, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / name, quality=90)
        sentences = [{"raw": f"photo {i} shows thing {j} in colour {i * 7 % 11}"} for j in range(captions)]
        records.append({"filename": name, "split": "val", "sentences": sentences})
    (root / "dataset_test.json").write_text(json.dumps({"dataset": "test", "images": records}))
    return root


@pytest.fixture(scope="session")
def encoder(tiny_bundle: Path) -> Iterator[BundleEncoder]:
    """The tiny bundle's towers in-process on CPU."""
    enc = BundleEncoder.from_bundle(tiny_bundle, SessionConfig(device="cpu", intra_op_threads=1))
    yield enc
    enc.close()


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    """12 images x 2 captions, plus one record whose image is missing."""
    return make_dataset(tmp_path / "data", 12, captions=2, missing=1)


@pytest.fixture(scope="session")
def encoder_services(tiny_bundle: Path) -> Iterator[tuple[str, str]]:
    """Both encoder services of the tiny bundle on free loopback ports (real gRPC servers, small max_batch)."""
    from image_encoder_service.server import create_server as create_image_server
    from imgtxt.encoders.image import ImageEncoder
    from imgtxt.encoders.text import TextEncoder
    from imgtxt.serving.config import ServerConfig
    from text_encoder_service.server import create_server as create_text_server

    cfg = SessionConfig(device="cpu", intra_op_threads=1)
    bundle = load_bundle(tiny_bundle)
    image = create_image_server(
        ServerConfig(host="127.0.0.1", port=0, max_batch=4), ImageEncoder.from_session_config(bundle, cfg)
    )
    text = create_text_server(
        ServerConfig(host="127.0.0.1", port=0, max_batch=4), TextEncoder.from_session_config(bundle, cfg)
    )
    try:
        image.warm_up()
        text.warm_up()
        yield f"127.0.0.1:{image.port}", f"127.0.0.1:{text.port}"
    finally:
        image.stop(grace=0)
        text.stop(grace=0)
