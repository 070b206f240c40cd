"""Tests of the symmetric InfoNCE loss: hand-computed values, image-id masking, temperature clamp, gradients."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from trainer.losses import InfoNCELoss, LossInputs, multi_positive_cross_entropy


def _eye(*rows: tuple[int, float]) -> torch.Tensor:
    """A 6-D vector from (axis, value) pairs."""
    v = torch.zeros(6)
    for axis, value in rows:
        v[axis] = value
    return v


def _masking_case(ids: list[int], text1_close_to_image0: bool) -> LossInputs:
    """Rows 0 and 1 may share an image id. Only s(image0, text1) changes between the two states (0 -> 0.8):

    image = e0, e1, e2; text0 = .6e0 + .8e3 (s=.6 with image0), text2 = .6e2 + .8e5;
    text1 = .6e1 + .8e4 (before) or .6e1 + .8e0 (after); s(image1, text1) = .6 in both.
    """
    image = torch.stack([_eye((0, 1.0)), _eye((1, 1.0)), _eye((2, 1.0))])
    text1 = _eye((1, 0.6), (0, 0.8)) if text1_close_to_image0 else _eye((1, 0.6), (4, 0.8))
    text = torch.stack([_eye((0, 0.6), (3, 0.8)), text1, _eye((2, 0.6), (5, 0.8))])
    return LossInputs(image=image, text=text, image_ids=torch.tensor(ids), epoch=1)


def test_hand_computed_two_pairs() -> None:
    # scale = 1 / 0.5 = 2; image = [e0, e1], text = [e0, (e0 + e1)/sqrt2]
    # logits = 2 * [[1, r], [0, r]] with r = 1/sqrt2, i.e. [[2, sqrt2], [0, sqrt2]].
    r = 1 / math.sqrt(2)
    inputs = LossInputs(
        image=torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        text=torch.tensor([[1.0, 0.0], [r, r]]),
        image_ids=torch.tensor([0, 1]),
    )
    s2 = math.sqrt(2)
    i2t = (math.log(1 + math.exp(s2 - 2)) + math.log(1 + math.exp(-s2))) / 2  # rows: targets 2 and sqrt2
    t2i = (math.log(1 + math.exp(-2)) + math.log(2)) / 2  # columns: col0 [2 vs 0], col1 [sqrt2 vs sqrt2]
    out = InfoNCELoss(init_temperature=0.5, learnable=False)(inputs)
    assert_close(out["infonce"], torch.tensor(0.5 * (i2t + t2i)))


def test_multi_positive_row_ignores_other_captions_of_the_image() -> None:
    # Row 0: columns 0 (target, logit 1) and 1 (same image, logit 5) and 2 (negative, logit 0).
    # Masked: CE = -log(e^1 / (e^1 + e^0)) = log(1 + e^-1); column 1 must not appear.
    logits = torch.tensor([[1.0, 5.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    pos = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    row_losses = [math.log(1 + math.exp(-1)), math.log(1 + math.exp(-1)), math.log(1 + 2 * math.exp(-1))]
    assert_close(multi_positive_cross_entropy(logits, pos), torch.tensor(sum(row_losses) / 3))


def test_same_image_caption_is_not_a_negative() -> None:
    loss = InfoNCELoss(learnable=False)
    shared_before = loss(_masking_case([7, 7, 3], False))["infonce"]
    shared_after = loss(_masking_case([7, 7, 3], True))["infonce"]
    distinct_before = loss(_masking_case([0, 1, 2], False))["infonce"]
    distinct_after = loss(_masking_case([0, 1, 2], True))["infonce"]
    # Masked: s(image0, text1) is out of every denominator, so moving text1 onto image0 changes nothing.
    assert_close(shared_after, shared_before)
    # Unmasked it is a hard negative and the loss rises.
    assert distinct_after > distinct_before + 0.1


def test_temperature_init_and_clamp() -> None:
    loss = InfoNCELoss()
    assert_close(loss.logit_scale.detach(), torch.tensor(math.log(1 / 0.07)))
    with torch.no_grad():
        loss.logit_scale.fill_(10.0)  # exp(10) ~ 22026, far above the cap
    assert_close(loss.scale().detach(), torch.tensor(100.0))
    inputs = _masking_case([0, 1, 2], True)
    reference = InfoNCELoss(init_temperature=0.01, learnable=False)(inputs)["infonce"]  # scale exactly 100
    assert_close(loss(inputs)["infonce"], reference)
    loss.clamp_()
    assert_close(loss.logit_scale.detach(), torch.tensor(math.log(100.0)))


def test_gradients_reach_embeddings_and_temperature() -> None:
    inputs = _masking_case([0, 1, 2], True)
    inputs.image.requires_grad_(True)
    inputs.text.requires_grad_(True)
    loss = InfoNCELoss()
    loss(inputs)["infonce"].backward()
    for grad in (inputs.image.grad, inputs.text.grad, loss.logit_scale.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
