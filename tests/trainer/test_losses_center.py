"""Tests of the in-batch centre loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from trainer.losses import CenterLoss, LossInputs


def test_hand_computed_centres_span_both_modalities() -> None:
    a = 1 / math.sqrt(2)
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.0, 1.0], [a, a], [1.0, 0.0]])
    inputs = LossInputs(image=image, text=text, image_ids=torch.tensor([5, 5, 9]))
    # id 5: points (1,0), (1,0), (0,1), (a,a); centre ((2+a)/4, (1+a)/4).
    cx, cy = (2 + a) / 4, (1 + a) / 4
    id5 = 2 * ((1 - cx) ** 2 + cy**2) + (cx**2 + (1 - cy) ** 2) + ((a - cx) ** 2 + (a - cy) ** 2)
    # id 9: points (0,1), (1,0); centre (.5, .5); each at squared distance .5.
    id9 = 0.5 + 0.5
    assert_close(CenterLoss()(inputs)["center"], torch.tensor((id5 + id9) / 6))


def test_one_caption_per_image_reduces_to_pair_alignment() -> None:
    gen = torch.Generator().manual_seed(1)
    image = F.normalize(torch.randn(4, 5, generator=gen), dim=-1)
    text = F.normalize(torch.randn(4, 5, generator=gen), dim=-1)
    inputs = LossInputs(image=image, text=text, image_ids=torch.arange(4))
    # Each pair's centre is its midpoint; both points are ||v - t|| / 2 away: mean_i ||v_i - t_i||^2 / 4.
    expected = ((image - text) ** 2).sum(dim=1).mean() / 4
    assert_close(CenterLoss()(inputs)["center"], expected)


def test_captions_of_one_image_are_pulled_together_not_apart() -> None:
    # Moving caption 1 onto the shared centre of image 5 lowers the loss when rows 0, 1 are the same image.
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    far = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    near = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    ids = torch.tensor([5, 5, 9])
    loss = CenterLoss()
    assert loss(LossInputs(image, near, ids))["center"] < loss(LossInputs(image, far, ids))["center"]
    assert_close(loss(LossInputs(image, near, ids))["center"], torch.tensor(0.0))


def test_center_gradients() -> None:
    image = F.normalize(torch.randn(4, 3), dim=-1).requires_grad_(True)
    text = F.normalize(torch.randn(4, 3), dim=-1).requires_grad_(True)
    CenterLoss()(LossInputs(image, text, torch.tensor([0, 0, 1, 1])))["center"].backward()
    for grad in (image.grad, text.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
