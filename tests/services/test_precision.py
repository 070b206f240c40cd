"""Precision: services load the bundle's graph for `--precision`, report it, and refuse one the bundle lacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imgtxt.bundle import load_bundle
from imgtxt.client import TextEncoderClient
from imgtxt.encoders.session import SessionConfig
from imgtxt.encoders.text import TextEncoder
from imgtxt.errors import BundleError
from imgtxt.serving.config import ServerConfig
from text_encoder_service.server import create_server

ROOT = Path(__file__).resolve().parents[2]
CPU = SessionConfig(device="cpu", intra_op_threads=1)
TEXTS = ["a dog runs on the beach", "two children play in the water"]


@pytest.fixture(scope="module")
def fp16_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.export import export_model
    from trainer.testing import tiny_model

    return export_model(tiny_model(seed=3), tmp_path_factory.mktemp("fp16") / "b", version="fp16-v1", fp16=True).path


def test_fp16_graph_is_served_and_reported(fp16_bundle: Path) -> None:
    bundle = load_bundle(fp16_bundle)
    full = TextEncoder.from_session_config(bundle, CPU, "fp32")
    half = TextEncoder.from_session_config(bundle, CPU, "fp16")
    assert (full.precision, half.precision, half.info.precision) == ("fp32", "fp16", "fp16")
    a, b = full.encode(TEXTS).embeddings, half.encode(TEXTS).embeddings
    assert not np.array_equal(a, b)  # another graph really runs
    assert (a * b).sum(1).min() > 0.99
    server = create_server(ServerConfig(host="127.0.0.1", port=0), half)
    server.warm_up()
    try:
        with TextEncoderClient(f"127.0.0.1:{server.port}") as client:
            assert client.info().precision == "fp16"
        metrics = server.metrics.registry.get_sample_value(
            "imgtxt_encoder_info",
            {
                "modality": "text",
                "bundle_version": "fp16-v1",
                "execution_provider": "CPUExecutionProvider",
                "precision": "fp16",
                "precision_reason": "--precision fp16 (flag)",
                "batching": "off",
            },
        )
        assert metrics == 1.0
    finally:
        server.stop(grace=0)


def test_auto_is_fp32_on_cpu(fp16_bundle: Path) -> None:
    assert TextEncoder.from_session_config(load_bundle(fp16_bundle), CPU, "auto").precision == "fp32"


def test_missing_precision_is_a_clear_error(tiny_bundle: Path) -> None:
    with pytest.raises(BundleError, match=r"no fp16 text graph \(it has: fp32\)"):
        TextEncoder.from_session_config(load_bundle(tiny_bundle), CPU, "fp16")


def test_service_refuses_to_start_with_a_precision_the_bundle_lacks(tiny_bundle: Path) -> None:
    cmd = [sys.executable, "-m", "text_encoder_service", "--bundle", str(tiny_bundle), "--port", "0"]
    proc = subprocess.run([*cmd, "--precision", "fp16"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no fp16 text graph" in proc.stderr and "imgtxt export --fp16" in proc.stderr


def test_int8_graphs_are_served_with_precision_int8(tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.conftest import make_dataset
    from trainer.export import export_model
    from trainer.testing import tiny_model

    root = tmp_path_factory.mktemp("int8")
    images = sorted((make_dataset(root / "data", 16) / "images").glob("*.jpg"))
    bundle = load_bundle(
        export_model(tiny_model(seed=4), root / "b", "int8-v1", int8=True, calibration_images=images).path
    )
    full = TextEncoder.from_session_config(bundle, CPU, "fp32")
    quantized = TextEncoder.from_session_config(bundle, CPU, "int8")
    assert (quantized.precision, quantized.info.precision) == ("int8", "int8")
    a, b = full.encode(TEXTS).embeddings, quantized.encode(TEXTS).embeddings
    assert not np.array_equal(a, b) and (a * b).sum(1).min() > 0.9
    assert TextEncoder.from_session_config(bundle, CPU, "auto").precision == "fp32"  # int8 only when asked for
