"""Tests of the int8 / binary quantisation helpers and the quantisation-aware loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from trainer.losses import InfoNCELoss, LossInputs, QuantizationLoss, binarize, binarize_st, int8_bounds, quantize_int8


def test_int8_bounds_follow_qdrant_quantile() -> None:
    # 1001 values 0.000 .. 1.000; quantile .99 keeps the central 99 %: the .005 and .995 quantiles.
    x = (torch.arange(1001, dtype=torch.float32) / 1000).reshape(7, 143)
    lo, hi = int8_bounds(x, quantile=0.99)
    assert_close(lo, torch.tensor(0.005))
    assert_close(hi, torch.tensor(0.995))
    lo_d, hi_d = int8_bounds(torch.tensor([[0.0, -2.0], [1.0, 2.0]]), quantile=1.0, per_dimension=True)
    assert_close(lo_d, torch.tensor([0.0, -2.0]))
    assert_close(hi_d, torch.tensor([1.0, 2.0]))
    lo_s, hi_s = int8_bounds(torch.tensor([[0.5, -2.0]]), quantile=1.0, symmetric=True)
    assert_close((lo_s, hi_s), (torch.tensor(-2.0), torch.tensor(2.0)))


def test_quantize_int8_hand_computed_and_straight_through() -> None:
    # Range [0, 1], step 1/255: 0.2 -> code 51 -> 0.2 exactly; 0.101 -> 25.755 -> 26 -> 26/255;
    # 1.5 clipped to 1 -> code 255 -> 1; -0.2 clipped to 0.
    x = torch.tensor([[0.2, 0.101, 1.5, -0.2]], requires_grad=True)
    q = quantize_int8(x, bounds=(torch.tensor(0.0), torch.tensor(1.0)))
    assert_close(q.detach(), torch.tensor([[0.2, 26 / 255, 1.0, 0.0]]))
    q.sum().backward()
    # Straight-through: identity inside the range, zero for the clipped components.
    assert x.grad is not None
    assert_close(x.grad, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))


def test_binarize_matches_qdrant_bits() -> None:
    # Qdrant binary quantisation: bit 1 iff the component is > 0 (0 maps to bit 0, i.e. -1).
    assert_close(binarize(torch.tensor([0.3, -0.2, 0.0])), torch.tensor([1.0, -1.0, -1.0]))


def test_binarize_st_forward_sign_backward_tanh() -> None:
    x = torch.tensor([[0.3, -0.2, 0.1, 0.05]], requires_grad=True)
    y = binarize_st(x, beta=0.5)
    assert_close(y.detach(), torch.tensor([[1.0, -1.0, 1.0, 1.0]]))
    y[0, 0].backward()
    # d/dx tanh(beta * sqrt(D) * x) at x = .3, beta .5, D 4: 1 * (1 - tanh(.3)^2).
    assert x.grad is not None
    assert_close(x.grad[0, 0], torch.tensor(1 - math.tanh(0.3) ** 2))


def test_binary_loss_hand_computed() -> None:
    # Signs: image0 (.8,.6) -> (1,1); image1 (.6,-.8) -> (1,-1); text0 (.6,.8) -> (1,1); text1 (-.6,-.8) -> (-1,-1).
    # Scaled by 1/sqrt2, scores = [[1, -1], [0, 0]]; temperature .5 -> logits [[2, -2], [0, 0]].
    image = torch.tensor([[0.8, 0.6], [0.6, -0.8]])
    text = torch.tensor([[0.6, 0.8], [-0.6, -0.8]])
    inputs = LossInputs(image=image, text=text, image_ids=torch.tensor([0, 1]))
    i2t = (math.log(1 + math.exp(-4)) + math.log(2)) / 2
    t2i = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-2))) / 2
    r = 1 / math.sqrt(2)
    error = (
        ((0.8 - r) ** 2 + (0.6 - r) ** 2)
        + ((0.6 - r) ** 2 + (-0.8 + r) ** 2)
        + ((0.6 - r) ** 2 + (0.8 - r) ** 2)
        + ((-0.6 + r) ** 2 + (-0.8 + r) ** 2)
    ) / 4
    out = QuantizationLoss(mode="binary", temperature=0.5)(inputs)
    assert_close(out["quant_retrieval"], torch.tensor(0.5 * (i2t + t2i)))
    assert_close(out["quant_error"], torch.tensor(error))


def test_int8_loss_is_close_to_float_loss_and_has_gradients() -> None:
    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(6, 32, generator=gen), dim=-1).requires_grad_(True)
    text = F.normalize(torch.randn(6, 32, generator=gen), dim=-1).requires_grad_(True)
    inputs = LossInputs(image=image, text=text, image_ids=torch.tensor([0, 0, 1, 2, 3, 4]))
    out = QuantizationLoss(mode="int8", temperature=0.05)(inputs)
    reference = InfoNCELoss(init_temperature=0.05, learnable=False)(inputs)["infonce"]
    assert_close(out["quant_retrieval"], reference, atol=0.05, rtol=0.02)  # 256 levels barely move the loss
    assert 0 < out["quant_error"].item() < 1e-2  # mostly the clipped 1 % tails
    # Without clipping only rounding remains: at most D * (step / 2)^2 per vector, step = range / 255.
    unclipped = QuantizationLoss(mode="int8", quantile=1.0)(inputs)["quant_error"].item()
    both = torch.cat([image, text]).detach()
    step = (both.max() - both.min()).item() / 255
    assert 0 < unclipped <= 32 * (step / 2) ** 2
    (out["quant_retrieval"] + out["quant_error"]).backward()
    for grad in (image.grad, text.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("retrieval", ["infonce", "triplet"])
def test_binary_retrieval_masks_same_image(retrieval: str) -> None:
    # Binary codes are per-vector (no batch statistics). text1 flips bits 0 and 1, where image0 has (+, +), image1
    # (+, -) and image2 (-, +): only s(image0, text1) changes (-.5 -> .5); s(image1, text1) = .5 and
    # s(image2, text1) = -.5 in both states.
    image = torch.tensor([[1.0, 1.0, -1.0, -1.0], [1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0]]) / 2
    text0 = torch.tensor([1.0, 1.0, -1.0, 1.0]) / 2
    text1_far = torch.tensor([-1.0, -1.0, 1.0, -1.0]) / 2
    text1_near = torch.tensor([1.0, 1.0, 1.0, -1.0]) / 2
    text2 = torch.tensor([-1.0, 1.0, -1.0, 1.0]) / 2
    loss = QuantizationLoss(mode="binary", retrieval=retrieval, margin=0.5)  # type: ignore[arg-type]

    def value(ids: list[int], text1: torch.Tensor) -> torch.Tensor:
        text = torch.stack([text0, text1, text2])
        return loss(LossInputs(image, text, torch.tensor(ids)))["quant_retrieval"]

    assert_close(value([7, 7, 3], text1_near), value([7, 7, 3], text1_far))
    assert value([0, 1, 2], text1_near) > value([0, 1, 2], text1_far)


def test_bad_mode_names_choices() -> None:
    with pytest.raises(ValueError, match="valid: int8, binary"):
        QuantizationLoss(mode="int4")  # type: ignore[arg-type]
