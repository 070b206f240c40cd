"""Shared fixtures: tiny bundles exported by the trainer's real exporter, and the real Flickr8k data if present."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgtxt.datasets import default_data_root


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete model bundle (image, text and unit ONNX graphs) of tiny random-weight towers, exported once."""
    from trainer.export import export_tiny_bundle

    return export_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny", dim=32, seed=0)


@pytest.fixture(scope="session")
def flickr8k() -> Path:
    """The real Flickr8k data beside the repository; tests that need it skip cleanly when it is absent."""
    root = default_data_root()
    if not (root / "dataset_flickr8k.json").is_file():
        pytest.skip(f"Flickr8k data not found at {root} (set IMGTXT_DATA)")
    return root
