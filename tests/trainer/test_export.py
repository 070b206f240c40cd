"""Export of tiny towers to a bundle: loads, unit-norm outputs, recorded parity, dynamic batch, tamper detection."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from imgtxt.bundle import load_bundle
from imgtxt.errors import BundleError
from imgtxt.preprocess import ImagePreprocessConfig
from imgtxt.text import TextTokenizer
from trainer.export import export_model, parity_image_inputs
from trainer.onnx_export import MIN_COSINE, export_onnx
from trainer.testing import tiny_model


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_tiny_bundle_loads_with_parity(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    m = bundle.manifest
    assert m.embedding_dim == 32 and m.onnx_opset == 17 and m.normalized
    for spec in (m.image, m.text, m.unit):
        assert spec is not None and spec.parity is not None
        assert spec.parity.min_cosine >= MIN_COSINE
        assert spec.parity.max_abs_diff < 1e-4
        assert spec.parity.num_inputs >= 5
    assert (tiny_bundle / "tokenizer.json").is_file()


@pytest.mark.parametrize("batch", [1, 5])
def test_outputs_unit_norm_for_dynamic_batch(tiny_bundle: Path, batch: int) -> None:
    m = load_bundle(tiny_bundle).manifest
    pixels = parity_image_inputs(m.image_preprocess, count=batch)
    (img,) = _session(tiny_bundle / m.image.file).run(["embedding"], {"pixel_values": pixels})
    assert img.shape == (batch, 32) and img.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)

    tok = TextTokenizer.from_file(tiny_bundle / m.text_config.tokenizer_file, m.text_config)
    texts = ["a dog", "two people walk on a long beach at sunset", "red car", "kids", "a cat on a mat"][:batch]
    enc = tok.encode(texts)
    (txt,) = _session(tiny_bundle / m.text.file).run(
        ["embedding"], {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
    )
    assert txt.shape == (batch, 32)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)

    assert m.unit is not None
    (unit,) = _session(tiny_bundle / m.unit.file).run(["embedding"], {"image": img, "text": txt})
    assert unit.shape == (batch, 32)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)


def test_padding_does_not_change_text_embedding(tiny_bundle: Path) -> None:
    m = load_bundle(tiny_bundle).manifest
    tok = TextTokenizer.from_file(tiny_bundle / m.text_config.tokenizer_file, m.text_config)
    alone = tok.encode(["a dog"])
    padded = tok.encode(["a dog", "a much longer caption about a dog running on the wet sand"])
    sess = _session(tiny_bundle / m.text.file)
    (a,) = sess.run(["embedding"], {"input_ids": alone.input_ids, "attention_mask": alone.attention_mask})
    (b,) = sess.run(["embedding"], {"input_ids": padded.input_ids, "attention_mask": padded.attention_mask})
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)


def test_metadata_carries_preprocessing(tiny_bundle: Path) -> None:
    m = load_bundle(tiny_bundle).manifest
    props = {p.key: p.value for p in onnx.load(str(tiny_bundle / m.image.file)).metadata_props}
    assert ImagePreprocessConfig.from_dict(json.loads(props["imgtxt.preprocess"])) == m.image_preprocess
    assert props["imgtxt.modality"] == "image"


def test_tampered_file_is_rejected(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    with open(copy / "image_tower.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(copy)


def test_export_fails_on_parity_violation(tmp_path: Path) -> None:
    class Diverges(torch.nn.Module):
        """Different outputs in the traced graph than in eager mode (a data-dependent Python branch)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.nn.functional.normalize(x, dim=-1)
            return -y if torch.jit.is_tracing() else y

    feeds = {"image": np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)}
    with pytest.raises(BundleError, match="min cosine"):
        export_onnx(Diverges(), feeds, tmp_path / "x.onnx", {"image": {0: "batch"}}, {})


def test_existing_bundle_dir_is_not_overwritten(tiny_bundle: Path) -> None:
    with pytest.raises(BundleError, match="immutable"):
        export_model(tiny_model(dim=8, with_unit=False), tiny_bundle, version="again")


def test_fp16_variant_keeps_float32_interface(tmp_path: Path) -> None:
    bundle = export_model(tiny_model(seed=1), tmp_path / "b16", version="fp16", fp16=True)
    m = bundle.manifest
    assert sorted(m.serving.precisions) == ["fp16", "fp32"]
    for name in ("image", "text", "unit"):
        variant = m.serving.graph(name, "fp16")
        sess = _session(bundle.file(variant.file))
        assert [o.type for o in sess.get_outputs()] == ["tensor(float)"]
        assert all(i.type in ("tensor(float)", "tensor(int64)") for i in sess.get_inputs())
        assert variant.parity is not None and variant.parity.min_cosine >= 0.99
        assert m.serving.graph(name, "fp32").file == m.tower(name).file
    pixels = parity_image_inputs(m.image_preprocess, count=3)
    (full,) = _session(bundle.file(m.image.file)).run(["embedding"], {"pixel_values": pixels})
    (half,) = _session(bundle.file(m.serving.graph("image", "fp16").file)).run(["embedding"], {"pixel_values": pixels})
    assert (full * half).sum(1).min() > 0.99


@pytest.mark.slow
def test_export_real_towers(tmp_path: Path) -> None:
    """EfficientNet-Lite0 + MiniLM (pretrained, untrained heads) through the same export path, parity-gated."""
    from trainer.model import DualEncoder, ModelSpec

    model = DualEncoder(ModelSpec(dim=64))
    bundle = export_model(model, tmp_path / "real", version="real")
    for name in ("image", "text", "unit"):
        parity = bundle.manifest.tower(name).parity
        assert parity is not None and parity.min_cosine >= MIN_COSINE


def test_flip_averaged_image_graph_is_mirror_invariant(tmp_path: Path) -> None:
    model = tiny_model(seed=2)
    plain = export_model(model, tmp_path / "plain", version="plain")
    flipped = export_model(model, tmp_path / "flip", version="flip", flip_average=True)
    assert flipped.manifest.training["export"] == {"flip_average": True, "image_size": 32}
    assert plain.manifest.training["export"] == {"flip_average": False, "image_size": 32}
    pixels = parity_image_inputs(flipped.manifest.image_preprocess, count=4)
    mirrored = np.ascontiguousarray(pixels[..., ::-1])

    def embed(bundle_dir: Path, x: np.ndarray) -> np.ndarray:
        return _session(bundle_dir / "image_tower.onnx").run(["embedding"], {"pixel_values": x})[0]

    np.testing.assert_allclose(embed(flipped.path, pixels), embed(flipped.path, mirrored), atol=1e-5)
    assert np.abs(embed(plain.path, pixels) - embed(plain.path, mirrored)).max() > 1e-3
    with torch.no_grad():
        one = model.image(torch.from_numpy(pixels)) + model.image(torch.from_numpy(mirrored))
    expected = torch.nn.functional.normalize(one, dim=-1).numpy()
    np.testing.assert_allclose(embed(flipped.path, pixels), expected, atol=1e-5)


def test_export_at_another_image_side(tmp_path: Path) -> None:
    """`image_size=` serves the same weights at another side: contract, graph and torch agree; the model keeps 32."""
    model = tiny_model(seed=3)
    bundle = export_model(model, tmp_path / "b48", version="b48", image_size=48)
    m = bundle.manifest
    assert m.image_preprocess.image_size == 48 and m.training["export"]["image_size"] == 48
    assert model.spec.image_size == 32 and model.image_preprocess.image_size == 32
    pixels = parity_image_inputs(m.image_preprocess, count=3)
    assert pixels.shape == (3, 3, 48, 48)
    (got,) = _session(bundle.path / m.image.file).run(["embedding"], {"pixel_values": pixels})
    with torch.no_grad():
        expected = model.image(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    with pytest.raises(BundleError, match="image_size must be >= 8"):
        export_model(model, tmp_path / "bad", version="bad", image_size=4)


def test_int8_variants_are_quantized_parity_checked_and_recorded(tmp_path: Path, synthetic_data: Path) -> None:
    from imgtxt.datasets import load_captioned_images

    train = [r.path for r in load_captioned_images(synthetic_data, split="train")]
    bundle = export_model(tiny_model(seed=2), tmp_path / "b8", version="int8", int8=True, calibration_images=train)
    m = bundle.manifest
    assert sorted(m.serving.precisions["int8"]) == ["image", "text"]  # the tiny unit head stays fp32
    ops = {}
    for name in ("image", "text"):
        variant = m.serving.graph(name, "int8")
        assert variant.parity is not None and variant.parity.min_cosine >= 0.9
        ops[name] = {node.op_type for node in onnx.load(str(bundle.file(variant.file))).graph.node}
        sess = _session(bundle.file(variant.file))
        assert [i.name for i in sess.get_inputs()] == m.tower(name).inputs  # the same interface as fp32
    assert "QuantizeLinear" in ops["image"] and "DequantizeLinear" in ops["image"]  # static (QDQ), calibrated
    assert "DynamicQuantizeLinear" in ops["text"] or "MatMulInteger" in ops["text"]  # dynamic
    assert load_bundle(bundle.path).manifest.serving == m.serving
    with pytest.raises(BundleError, match="calibration"):
        export_model(tiny_model(), tmp_path / "none", version="x", int8=True)


def test_the_unit_head_is_trained_only_when_a_unit_loss_with_positive_weight_trained_it(tmp_path: Path) -> None:
    """A head exported from a run with `unit_loss_weight=0` is untrained: indexing units then needs the opt-in."""
    untrained = export_model(tiny_model(dim=8), tmp_path / "u0", "u0", training={"loss": {"unit_weight": 0.0}})
    trained = export_model(tiny_model(dim=8), tmp_path / "u1", "u1", training={"loss": {"unit_weight": 0.1}})
    headless = export_model(tiny_model(dim=8, with_unit=False), tmp_path / "none", "none", training={})
    got = [load_bundle(b.path).manifest.serving for b in (untrained, trained, headless)]
    assert [(s.unit_head, s.unit_provenance) for s in got] == [(True, "untrained"), (True, "trained"), (False, "none")]
