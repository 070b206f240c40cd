"""The feature cache's ONNX Runtime path: the shared export helper, parity against torch, the torch fallback."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from imgtxt.bundle import Parity
from trainer import onnx_export
from trainer.config import load_config
from trainer.data import cache
from trainer.model import DualEncoder


def _model() -> DualEncoder:
    torch.manual_seed(0)
    return DualEncoder(load_config("tiny").model).eval()


def test_frozen_stages_go_through_the_export_helper_and_agree_with_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    model, exported = _model(), []

    def spy(*args: object, **kwargs: object) -> onnx_export.ExportedGraph:
        graph = onnx_export.export_onnx(*args, **kwargs)  # type: ignore[arg-type]
        exported.append(graph)
        return graph

    monkeypatch.setattr(cache, "export_onnx", spy)
    run = cache._onnx_image_stages(model, 2, 32)
    assert run is not None and len(exported) == 1
    assert exported[0].parity.min_cosine >= onnx_export.MIN_COSINE
    pixels = np.random.default_rng(1).normal(size=(3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = model.image.features(torch.from_numpy(pixels), 2).numpy()
    np.testing.assert_allclose(run(pixels), expected, atol=1e-5)


def test_a_parity_failure_falls_back_to_torch(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    broken = Parity(max_abs_diff=1.0, min_cosine=0.5, num_inputs=2)
    monkeypatch.setattr(onnx_export, "measure_parity", lambda *args, **kwargs: broken)
    with caplog.at_level(logging.WARNING, logger="trainer.data.cache"):
        assert cache._onnx_image_stages(_model(), 2, 32) is None
    assert "disagree with torch" in caplog.text and "min cosine 0.500000" in caplog.text
