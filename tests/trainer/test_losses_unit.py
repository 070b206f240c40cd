"""Tests of the retrieval-unit hinge loss and of the gated fusion head that builds the units."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from trainer.fusion import GatedFusion
from trainer.losses import LossInputs, UnitHingeLoss

R = 1 / math.sqrt(2)


def _e(*pairs: tuple[int, float]) -> torch.Tensor:
    v = torch.zeros(8)
    for axis, value in pairs:
        v[axis] = value
    return v


def _unit_case(ids: list[int], unit1_close_to_pair0: bool) -> LossInputs:
    """image = e0, e1, e2; text = e3, e4, e5; units u0 = .6 (e0+e3)/sqrt2 + .8 e7, u2 = (e2+e5)/sqrt2,
    u1 = .5 e1 + .5 e4 + w/sqrt2 with w = e6 (before) or (e0+e3)/sqrt2 (after).

    Query-unit scores: t0.u0 = v0.u0 = .6/sqrt2; t1.u1 = v1.u1 = .5; t2.u2 = v2.u2 = 1/sqrt2; t0.u1 = v0.u1 =
    0 (before) or .5 (after); everything else 0.
    """
    w = _e((0, R), (3, R)) if unit1_close_to_pair0 else _e((6, 1.0))
    unit = torch.stack([_e((0, 0.6 * R), (3, 0.6 * R), (7, 0.8)), _e((1, 0.5), (4, 0.5)) + R * w, _e((2, R), (5, R))])
    image = torch.stack([_e((0, 1.0)), _e((1, 1.0)), _e((2, 1.0))])
    text = torch.stack([_e((3, 1.0)), _e((4, 1.0)), _e((5, 1.0))])
    return LossInputs(image=image, text=text, image_ids=torch.tensor(ids), epoch=1, unit=unit)


def test_unit_hinge_hand_computed() -> None:
    # margin .5, distinct ids, after: query 0 max(.5 + .5 - .6/sqrt2, .5 + 0 - .6/sqrt2) = 1 - .6/sqrt2;
    # query 1: .5 + 0 - .5 = 0; query 2: .5 - 1/sqrt2 < 0 -> 0. Same for text and image queries.
    out = UnitHingeLoss(margin=0.5)(_unit_case([0, 1, 2], True))
    expected = torch.tensor((1 - 0.6 * R) / 3)
    assert_close(out["unit_text_hinge"], expected)
    assert_close(out["unit_image_hinge"], expected)


def test_unit_of_the_same_image_is_not_a_negative() -> None:
    loss = UnitHingeLoss(margin=0.5)
    shared = [loss(_unit_case([7, 7, 3], after)) for after in (False, True)]
    # Masked: query 0's only negative is u2 (score 0): .5 - .6/sqrt2; queries 1, 2 cost 0.
    assert_close(shared[0]["unit_text_hinge"], torch.tensor((0.5 - 0.6 * R) / 3))
    assert_close(shared[1]["unit_text_hinge"], shared[0]["unit_text_hinge"])
    assert_close(shared[1]["unit_image_hinge"], shared[0]["unit_image_hinge"])
    distinct = [loss(_unit_case([0, 1, 2], after))["unit_text_hinge"] for after in (False, True)]
    assert distinct[1] > distinct[0] + 0.1


def test_unit_warmup_and_requirement() -> None:
    # epoch 0 < warmup 1: sum over negatives. Distinct ids, after: query 0 (1 - .6/sqrt2) + (.5 - .6/sqrt2);
    # query 1: u0 (.5 + 0 - .5 = 0) + u2 (0); query 2: 0.
    case = _unit_case([0, 1, 2], True)
    case.epoch = 0
    out = UnitHingeLoss(margin=0.5, warmup_epochs=1)(case)
    assert_close(out["unit_text_hinge"], torch.tensor((1.5 - 1.2 * R) / 3))
    case.unit = None
    with pytest.raises(ValueError, match=r"LossInputs\.unit"):
        UnitHingeLoss()(case)


def test_unit_gradients_reach_queries_and_units() -> None:
    case = _unit_case([0, 1, 2], True)
    for tensor in (case.image, case.text, case.unit):
        assert tensor is not None
        tensor.requires_grad_(True)
    loss = UnitHingeLoss(margin=0.5)
    terms = loss(case)
    loss.total(terms).backward()
    for tensor in (case.image, case.text, case.unit):
        assert tensor is not None and tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_gated_fusion_starts_as_gated_average() -> None:
    fusion = GatedFusion(2)
    with torch.no_grad():
        fusion.gate.weight.zero_()
        fusion.gate.bias.zero_()  # g = sigmoid(0) = .5
    # The MLP's last layer starts at zero, so u = normalize(.5 e0 + .5 e1) = (1/sqrt2, 1/sqrt2).
    unit = fusion(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert_close(unit, torch.tensor([[R, R]]))


def test_gated_fusion_unit_norm_and_gradients() -> None:
    torch.manual_seed(0)
    fusion = GatedFusion(16, hidden_dim=8)
    image = F.normalize(torch.randn(5, 16), dim=-1).requires_grad_(True)
    text = F.normalize(torch.randn(5, 16), dim=-1).requires_grad_(True)
    unit = fusion(image, text)
    assert unit.shape == (5, 16)
    assert_close(unit.norm(dim=-1), torch.ones(5))
    (unit * torch.randn(5, 16)).sum().backward()
    assert image.grad is not None and text.grad is not None and image.grad.abs().sum() > 0
    assert fusion.gate.weight.grad is not None and fusion.gate.weight.grad.abs().sum() > 0


def test_gated_fusion_exports_to_onnx(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    fusion = GatedFusion(8).eval()
    with torch.no_grad():
        for param in fusion.parameters():
            param.normal_(0, 0.3)  # non-zero MLP output so the whole graph is exercised
    image, text = torch.randn(3, 8), torch.randn(3, 8)
    path = tmp_path / "fusion.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript exporter is the fast one (the dynamo exporter takes seconds); both see the same plain ops.
        torch.onnx.export(
            fusion,
            (image, text),
            path,
            dynamo=False,
            input_names=["image", "text"],
            output_names=["unit"],
            dynamic_axes={"image": {0: "batch"}, "text": {0: "batch"}, "unit": {0: "batch"}},
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image5, text5 = torch.randn(5, 8), torch.randn(5, 8)  # a different batch size than at export
    (got,) = session.run(None, {"image": image5.numpy(), "text": text5.numpy()})
    with torch.no_grad():
        assert_close(torch.from_numpy(got), fusion(image5, text5), atol=1e-5, rtol=1e-5)
