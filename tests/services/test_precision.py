"""Precision: services load the bundle's graph for `--precision`, report it, and refuse one the bundle lacks."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from evaluation.cli import main as eval_main
from imgtxt.bundle import GraphVariant, RetrievalCheck, ServingSpec, load_bundle, write_bundle
from imgtxt.client import TextEncoderClient
from imgtxt.datasets import load_captioned_images
from imgtxt.encoders.image import ImageEncoder
from imgtxt.encoders.session import SessionConfig, choose_precision
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
                "batching": "adaptive",
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


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny bundle exported with `--int8` and its val check, and the dataset it was checked on."""
    from tests.conftest import make_dataset
    from trainer.export import export_model
    from trainer.testing import tiny_model

    root = tmp_path_factory.mktemp("int8")
    data = make_dataset(root / "data", 16)
    images = sorted((data / "images").glob("*.jpg"))
    check = load_captioned_images(data, split="val")
    model = tiny_model(seed=4)
    path = export_model(model, root / "b", "int8-v1", int8=True, calibration_images=images, int8_check=check).path
    return path, data


def _recording(bundle: Path, out: Path, losses: dict[str, float]) -> Path:
    """A copy of `bundle` whose int8 graphs record the given val rSum losses (the graphs are the same files)."""
    loaded = load_bundle(bundle)
    serving = loaded.manifest.serving
    int8 = {
        m: replace(v, retrieval=RetrievalCheck("val", 16, 200.0, 200.0 - losses[m]))
        for m, v in serving.precisions["int8"].items()
    }
    manifest = replace(loaded.manifest, serving=replace(serving, precisions={**serving.precisions, "int8": int8}))
    return write_bundle(out, manifest, {name: bundle / name for name in loaded.manifest.files}).path


def test_int8_graphs_are_served_with_precision_int8(int8_bundle: tuple[Path, Path]) -> None:
    bundle = load_bundle(int8_bundle[0])
    full = TextEncoder.from_session_config(bundle, CPU, "fp32")
    quantized = TextEncoder.from_session_config(bundle, CPU, "int8")
    assert (quantized.precision, quantized.info.precision) == ("int8", "int8")
    a, b = full.encode(TEXTS).embeddings, quantized.encode(TEXTS).embeddings
    assert not np.array_equal(a, b) and (a * b).sum(1).min() > 0.9


def test_export_records_each_int8_towers_val_rsum_as_eval_measures_it(
    int8_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    path, data = int8_bundle
    serving = load_bundle(path).manifest.serving
    checks = {m: serving.graph(m, "int8").retrieval for m in ("image", "text")}
    assert all(c is not None and (c.split, c.images) == ("val", 16) for c in checks.values())
    out = tmp_path / "fp32.json"
    assert eval_main(["--bundle", str(path), "--data", str(data), "--device", "cpu", "--precision", "fp32",
                      "--json", str(out)]) == 0  # fmt: skip
    fp32_rsum = json.loads(out.read_text())["rsum"]
    assert [c.fp32_rsum for c in checks.values() if c] == [pytest.approx(fp32_rsum)] * 2


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_eval_evaluates_the_precision_it_is_given(
    int8_bundle: tuple[Path, Path], tmp_path: Path, precision: str
) -> None:
    path, data = int8_bundle
    out = tmp_path / "eval.json"
    args = ["--bundle", str(path), "--data", str(data), "--device", "cpu", "--precision", precision]
    assert eval_main([*args, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["precision"] == {"image": precision, "text": precision}


def test_auto_serves_int8_on_cpu_only_where_the_bundle_proves_it_safe(
    int8_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    recorded = load_bundle(_recording(int8_bundle[0], tmp_path / "b", {"image": 0.8, "text": 0.2}))
    image = ImageEncoder.from_session_config(recorded, CPU, "auto")
    text = TextEncoder.from_session_config(recorded, CPU, "auto")
    assert (image.precision, text.precision) == ("fp32", "int8")
    reason = "auto: int8 loses {} val rSum (16 images, 200.00 at fp32; loss +{} {} 0.5)"
    assert image.info.precision_reason == reason.format("0.80", "0.80", ">")
    assert text.info.precision_reason == reason.format("0.20", "0.20", "<=")
    server = create_server(ServerConfig(host="127.0.0.1", port=0), text)
    server.warm_up()
    try:
        with TextEncoderClient(f"127.0.0.1:{server.port}") as client:
            info = client.info()
        assert (info.precision, info.precision_reason) == ("int8", text.info.precision_reason)
        labels = {"modality": "text", "bundle_version": "int8-v1", "execution_provider": "CPUExecutionProvider"}
        labels |= {"precision": "int8", "precision_reason": info.precision_reason, "batching": "adaptive"}
        assert server.metrics.registry.get_sample_value("imgtxt_encoder_info", labels) == 1.0
    finally:
        server.stop(grace=0)
    # the exported bundle itself: auto follows the loss its export measured
    measured = load_bundle(int8_bundle[0])
    check = measured.manifest.serving.graph("text", "int8").retrieval
    assert check is not None
    expected = "int8" if check.rsum_loss <= 0.5 else "fp32"
    assert TextEncoder.from_session_config(measured, CPU, "auto").precision == expected


def _serving(int8: dict[str, GraphVariant], fp16: bool = False) -> ServingSpec:
    fp32 = {"image": GraphVariant("image.onnx"), "text": GraphVariant("text.onnx")}
    precisions = {"fp32": fp32, "int8": int8, **({"fp16": fp32} if fp16 else {})}
    return ServingSpec(image_size=224, precisions=precisions)


def test_choose_precision_on_fake_bundles() -> None:
    checked = lambda loss: GraphVariant("i8.onnx", None, RetrievalCheck("val", 1000, 260.0, 260.0 - loss))  # noqa: E731
    cpu, cuda = "CPUExecutionProvider", "CUDAExecutionProvider"
    safe = _serving({"image": checked(0.5), "text": checked(-0.3)})
    assert choose_precision("auto", "image", safe, cpu).precision == "int8"  # at the bound
    gain = choose_precision("auto", "text", safe, cpu)
    assert gain.precision == "int8" and gain.reason.startswith("auto: int8 gains 0.30 val rSum")
    lossy = _serving({"image": checked(0.51), "text": GraphVariant("i8.onnx")})
    assert choose_precision("auto", "image", lossy, cpu).precision == "fp32"
    unmeasured = choose_precision("auto", "text", lossy, cpu)
    assert unmeasured.precision == "fp32" and "no recorded val rSum check" in unmeasured.reason
    assert choose_precision("auto", "image", _serving({}), cpu).reason == "auto: the bundle has no int8 graph"
    assert choose_precision("auto", "image", _serving({"image": checked(0.0)}, fp16=True), cuda).precision == "fp16"
    assert choose_precision("auto", "image", safe, cuda).precision == "fp32"  # int8 is a CPU choice
    flag = choose_precision("fp32", "image", safe, cpu)
    assert (flag.precision, flag.source, flag.reason) == ("fp32", "flag", "--precision fp32 (flag)")
