"""The domain encoders (no gRPC): parity with a bare ONNX Runtime run, per-item outcomes, session factory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from imgtxt.bundle import load_bundle
from imgtxt.encoders.image import ImageEncoder
from imgtxt.encoders.session import CUDA, DeviceUnavailable, SessionConfig, create_session
from imgtxt.encoders.text import TextEncoder
from imgtxt.encoders.types import ItemCode
from imgtxt.preprocess import preprocess_image
from imgtxt.text import TextTokenizer
from tests.services.conftest import TEST_IMAGE_LIMITS, make_image


def test_image_encoder_matches_bare_onnx_runtime(image_encoder: ImageEncoder, tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    images = [make_image(i) for i in range(3)]
    pixels = np.stack([preprocess_image(b, bundle.manifest.image_preprocess) for b in images])
    session = ort.InferenceSession(str(bundle.file(bundle.manifest.image.file)), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"pixel_values": pixels})
    result = image_encoder.encode(images)
    assert all(o.ok for o in result.outcomes)
    np.testing.assert_allclose(result.embeddings, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-5)


def test_text_encoder_matches_bare_onnx_runtime(text_encoder: TextEncoder, tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    texts = ["a dog runs on the beach", "two children play football in a park"]
    tok = TextTokenizer.from_file(bundle.file(bundle.manifest.text_config.tokenizer_file), bundle.manifest.text_config)
    batch = tok.encode(texts)
    session = ort.InferenceSession(str(bundle.file(bundle.manifest.text.file)), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
    result = text_encoder.encode(texts)
    np.testing.assert_allclose(result.embeddings, expected, atol=1e-5)
    assert [o.num_tokens for o in result.outcomes] == batch.num_tokens


def test_text_embedding_does_not_depend_on_batch_padding(text_encoder: TextEncoder) -> None:
    alone = text_encoder.encode(["a dog"]).embeddings[0]
    padded = text_encoder.encode(["a dog", "a much longer caption about a dog running along a sandy beach"])
    np.testing.assert_allclose(padded.embeddings[0], alone, atol=1e-5)


def test_bad_items_fail_alone_with_zero_rows(image_encoder: ImageEncoder) -> None:
    result = image_encoder.encode([make_image(0), b"not an image", b"", make_image(1)])
    assert [o.code for o in result.outcomes] == [ItemCode.OK, ItemCode.INVALID_ARGUMENT, ItemCode.INVALID_ARGUMENT, 0]
    assert result.outcomes[1].message.startswith("item 1:")
    assert not result.embeddings[1].any() and not result.embeddings[2].any()
    assert result.ok.tolist() == [True, False, False, True]


def test_text_outcomes(text_encoder: TextEncoder) -> None:
    max_tokens = text_encoder.text_config.max_tokens
    result = text_encoder.encode(["a dog", "   ", "word " * (3 * max_tokens), "\x00\x01"])
    ok, empty, long, control = result.outcomes
    assert ok.ok and not ok.truncated and ok.num_tokens > 2
    assert empty.code == ItemCode.INVALID_ARGUMENT and "item 1" in empty.message and "empty" in empty.message
    assert long.ok and long.truncated and long.num_tokens == max_tokens
    assert control.code == ItemCode.INVALID_ARGUMENT and control.message.startswith("item 3:")


def test_info_reports_provider_and_limits(image_encoder: ImageEncoder, text_encoder: TextEncoder) -> None:
    assert image_encoder.info.execution_provider == "CPUExecutionProvider"
    assert image_encoder.info.limits == {"max_image_bytes": 100_000, "max_image_pixels": 1_000_000}
    assert text_encoder.info.limits["max_tokens"] == text_encoder.text_config.max_tokens
    assert text_encoder.info.dim == 32 and text_encoder.info.modality == "text"


def test_optimised_model_is_cached_and_reused(tiny_bundle: Path, tmp_path: Path) -> None:
    first = ImageEncoder.from_bundle(tiny_bundle, device="cpu", cache_dir=tmp_path, limits=TEST_IMAGE_LIMITS)
    cached = list(tmp_path.glob("*/image_tower.cpu.all.CPUExecutionProvider.onnx"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    second = ImageEncoder.from_bundle(tiny_bundle, device="cpu", cache_dir=tmp_path, limits=TEST_IMAGE_LIMITS)
    assert cached[0].stat().st_mtime_ns == mtime
    images = [make_image(5)]
    np.testing.assert_allclose(first.encode(images).embeddings, second.encode(images).embeddings, atol=1e-6)


def test_device_cuda_fails_clearly_without_cuda(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    probe = ort.InferenceSession(str(bundle.file(bundle.manifest.text.file)), providers=[CUDA, "CPUExecutionProvider"])
    if probe.get_providers()[0] == CUDA:
        pytest.skip("CUDA is usable here")
    with pytest.raises(DeviceUnavailable, match="--device cuda"):
        create_session(bundle.file(bundle.manifest.text.file), SessionConfig(device="cuda"))


def test_session_config_validation() -> None:
    with pytest.raises(ValueError, match="auto"):
        SessionConfig(device="gpu")
