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


def test_concept_centres_are_learned_and_pull_each_pair_to_its_nearest() -> None:
    from trainer.losses import ConceptCenterLoss

    loss = ConceptCenterLoss(dim=2, num_concepts=2)
    with torch.no_grad():
        loss.centres.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))  # unit-normalised when used: (1,0), (0,1)
    a = 1 / math.sqrt(2)
    # Pair 0 (image (1,0), caption (a,a)): mean direction nearer (1,0); pair 1 ((0,1), (0,1)): nearer (0,1).
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    text = torch.tensor([[a, a], [0.0, 1.0]])
    inputs = LossInputs(image=image, text=text, image_ids=torch.tensor([0, 1]))
    assert loss.assign(image, text).tolist() == [0, 1]
    # Pair 0: ||(1,0)-(1,0)||² = 0, ||(a,a)-(1,0)||² = 2 - 2a; pair 1: 0 + 0. Mean over rows of half the sum.
    out = loss(inputs)["concept_center"]
    assert_close(out, torch.tensor((2 - 2 * a) / 2 / 2))
    out.backward()
    assert loss.centres.grad is not None and loss.centres.grad[0].abs().sum() > 0  # the centre learns
    assert loss.centres.grad[1].abs().sum() == 0  # pair 1 sits on its centre already
    # Built by name with the model's dim, its centres are trained parameters of the combined loss.
    from trainer.losses import CombinedLoss
    from trainer.model import ModelSpec

    combined = CombinedLoss({"concept_center": 0.1}, model=ModelSpec(dim=32))
    assert [p.shape for p in combined.parameters()] == [torch.Size([64, 32])]
