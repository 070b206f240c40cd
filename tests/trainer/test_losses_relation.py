"""Tests of HREM's relation module and loss (its neighbour batch sampler: test_sampling)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.testing import assert_close

from trainer.losses import LossInputs, RelationLoss, RelationModule, positive_mask
from trainer.losses.base import zero_loss
from trainer.losses.relation import Enhanced, connection_mask, similarity_kl
from trainer.losses.relation_fragments import Fragments


def _vec(*pairs: tuple[int, float]) -> Tensor:
    v = torch.zeros(6)
    for axis, value in pairs:
        v[axis] = value
    return v


def _masking_case(ids: list[int], text1_close_to_image0: bool) -> LossInputs:
    """Scores image @ text.T are diag(.6) and 0 elsewhere, except s(image0, text1) = 0 (before) or 0.8 (after)."""
    image = torch.stack([_vec((0, 1.0)), _vec((1, 1.0)), _vec((2, 1.0))])
    text1 = _vec((1, 0.6), (0, 0.8)) if text1_close_to_image0 else _vec((1, 0.6), (4, 0.8))
    text = torch.stack([_vec((0, 0.6), (3, 0.8)), text1, _vec((2, 0.6), (5, 0.8))])
    return LossInputs(image=image, text=text, image_ids=torch.tensor(ids), epoch=1)


class _Identity(nn.Module):
    def forward(self, image: Tensor, text: Tensor, image_ids: Tensor, fragments: Fragments | None) -> Enhanced:
        return Enhanced(image, text, zero_loss(image))


def test_identity_relation_gives_vsepp_and_zero_consistency() -> None:
    # With enhanced == initial the triplet is plain VSE++ (margin .7, distinct ids: 2.2/3, see the triplet tests)
    # and the two similarity distributions are identical (KL 0).
    # HREM sums its three relation hinges (3 : 1 against the base hinge); `aggregate: mean` averages them.
    loss = RelationLoss(margin=0.7, module=_Identity(), aggregate="mean")
    out = loss(_masking_case([0, 1, 2], True))
    assert_close(out["relation_triplet"], torch.tensor(2.2 / 3))
    assert_close(out["relation_consistency"], torch.tensor(0.0))
    summed = RelationLoss(margin=0.7, module=_Identity())
    assert_close(summed(_masking_case([0, 1, 2], True))["relation_triplet"], torch.tensor(2.2))
    # Same-image caption is not a negative of the enhanced triplet either: .1 per anchor and direction.
    shared = [loss(_masking_case([7, 7, 3], after))["relation_triplet"] for after in (False, True)]
    assert_close(shared[0], torch.tensor(0.2))
    assert_close(shared[1], shared[0])
    with pytest.raises(ValueError, match="aggregate"):
        RelationLoss(module=_Identity(), aggregate="max")


def test_similarity_kl_hand_computed() -> None:
    # Row 0: softmax([1, 0]) on both sides -> 0. Row 1: p = softmax([0, 0]) = (.5, .5), q = softmax([0, 1]):
    # KL = .5 log(.5 (1+e)) + .5 log(.5 (1+e) / e). Batch mean over 2 rows.
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    e = math.e
    row1 = 0.5 * math.log(0.5 * (1 + e)) + 0.5 * math.log(0.5 * (1 + e) / e)
    pos = positive_mask(torch.tensor([0, 1]))
    assert_close(similarity_kl(student, teacher, pos, temperature=1.0), torch.tensor(row1 / 2))


def test_similarity_kl_ignores_same_image_columns() -> None:
    # Columns of another caption of the same image drop out of both distributions, whatever their value.
    pos = positive_mask(torch.tensor([0, 0, 1]))
    student = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    teacher_a = torch.tensor([[1.0, 5.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    teacher_b = torch.tensor([[1.0, -5.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    kl_a = similarity_kl(student, teacher_a, pos, 1.0)
    assert_close(kl_a, similarity_kl(student, teacher_b, pos, 1.0))
    assert_close(kl_a, torch.tensor(0.0))


def test_connection_mask_keeps_self_and_the_most_similar_fraction_of_each_modality() -> None:
    image = torch.eye(4)
    text = torch.tensor([[1.0, 0.1, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.9, 0.0, 0.4, 0.0], [0.0, 0.0, 0.0, 1.0]])
    blocked = connection_mask(image, text, fraction=0.5)
    assert blocked.shape == (8, 8) and not blocked.diagonal().any()
    connected = ~blocked
    # Image 0 attends to captions 0 and 2 (its two most similar of four), not to 1 or 3.
    assert connected[0, 4:].tolist() == [True, False, True, False]
    # Caption 2 (row 6) attends to images 0 and 2 (scores .9 and .4) and to the two captions closest to it.
    assert connected[6, :4].tolist() == [True, False, True, False]
    assert int(connected[6, 4:].sum()) == 2 and bool(connected[6, 6])
    assert not connection_mask(image, text, fraction=1.0).any()


def test_relation_module_starts_as_the_identity_and_learns_relations() -> None:
    torch.manual_seed(0)
    image = F.normalize(torch.randn(5, 8), dim=-1).requires_grad_(True)
    text = F.normalize(torch.randn(5, 8), dim=-1).requires_grad_(True)
    ids = torch.tensor([0, 0, 1, 2, 3])
    identity = RelationModule(dim=8, num_heads=2, dropout=0.0, layer_scale=0.0)
    image_enh, text_enh, _ = identity(image, text, ids)
    assert_close(image_enh, image)
    assert_close(text_enh, text)
    module = RelationModule(dim=8, num_heads=2, dropout=0.0)
    image_enh, text_enh, _ = module(image, text, ids)
    assert image_enh.shape == text_enh.shape == (5, 8)
    assert_close(image_enh.norm(dim=-1), torch.ones(5))
    assert not torch.allclose(image_enh, image)  # the batch changed it ...
    assert (image_enh * image).sum(-1).min() > 0.9  # ... as a correction of the instance, not in place of it
    (image_enh @ text_enh.T).diagonal().sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="must divide"):
        RelationModule(dim=10, num_heads=4)


def test_relation_terms_start_at_start_epoch() -> None:
    loss = RelationLoss(dim=6, num_heads=2, start_epoch=2)
    case = _masking_case([0, 1, 2], True)
    image = case.image.clone().requires_grad_(True)
    before = loss(LossInputs(image, case.text, case.image_ids, epoch=1))
    assert before["relation_triplet"].item() == 0.0 and before["relation_consistency"].item() == 0.0
    before["relation_triplet"].backward()  # attached to the graph: the combined loss can still backprop
    after = loss(LossInputs(case.image, case.text, case.image_ids, epoch=2))
    assert after["relation_triplet"].item() > 0.0


def test_consistency_does_not_train_the_relation_module() -> None:
    torch.manual_seed(0)
    loss = RelationLoss(dim=8, num_heads=2, consistency_weight=1.0)
    image = F.normalize(torch.randn(4, 8), dim=-1).requires_grad_(True)
    text = F.normalize(torch.randn(4, 8), dim=-1).requires_grad_(True)
    out = loss(LossInputs(image, text, torch.arange(4), epoch=1))
    out["relation_consistency"].backward()
    assert image.grad is not None and image.grad.abs().sum() > 0  # the initial embeddings learn from it
    for param in loss.relation.parameters():  # the enhanced side is the (stop-grad) teacher
        assert param.grad is None or param.grad.abs().sum() == 0


def test_self_only_control_attends_to_nothing_but_itself() -> None:
    # Each enhanced instance depends on that instance alone: changing one caption leaves every other output as is,
    # while under HREM's similarity connections it moves the instances connected to that caption.
    torch.manual_seed(0)
    image = F.normalize(torch.randn(4, 8), dim=-1)
    text = F.normalize(torch.randn(4, 8), dim=-1)
    moved = text.clone()
    moved[3] = F.normalize(torch.randn(8), dim=-1)
    ids = torch.arange(4)
    for connections, others_change in (("self", False), ("similarity", True)):
        torch.manual_seed(1)
        module = RelationModule(dim=8, num_heads=2, dropout=0.0, connections=connections, layer_scale=1.0).eval()
        before, after = module(image, text, ids), module(image, moved, ids)
        changed = not torch.allclose(before[0], after[0], atol=1e-6)
        assert changed == others_change, connections
        assert torch.allclose(before[1][:3], after[1][:3], atol=1e-6) == (not others_change)
    with pytest.raises(ValueError, match="connections"):
        RelationModule(dim=8, num_heads=2, connections="all")


def test_relevance_bias_adds_exp_distance_to_connected_logits_only() -> None:
    from trainer.losses.relation import relevance_bias

    # Image (1, 0), caption (0, 1): distance sqrt 2 between them, 0 to themselves.
    image, text = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    blocked = torch.tensor([[False, True], [False, False]])
    bias = relevance_bias(image, text, blocked, weight=2.0, sigma=1.0)
    assert bias[0, 0].item() == pytest.approx(2.0) and bias[1, 1].item() == pytest.approx(2.0)
    assert bias[1, 0].item() == pytest.approx(2.0 * math.exp(-math.sqrt(2)))
    assert bias[0, 1].item() == float("-inf")
    # In the module, the bias changes the output (weight 0 is the plain mask).
    torch.manual_seed(0)
    img = F.normalize(torch.randn(4, 8), dim=-1)
    txt = F.normalize(torch.randn(4, 8), dim=-1)
    outs = []
    for weight in (0.0, 5.0):
        torch.manual_seed(1)
        module = RelationModule(dim=8, num_heads=2, dropout=0.0, layer_scale=1.0, relevance_weight=weight).eval()
        outs.append(module(img, txt, torch.arange(4))[0])
    assert not torch.allclose(outs[0], outs[1])
