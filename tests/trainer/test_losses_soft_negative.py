"""Tests of the BCLS-style losses: soft-negative triplet and the Kendall rank loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from trainer.losses import BCLSLoss, KendallRankLoss, LossInputs, SoftNegativeTripletLoss


def _vec(*pairs: tuple[int, float]) -> torch.Tensor:
    v = torch.zeros(6)
    for axis, value in pairs:
        v[axis] = value
    return v


def _masking_case(ids: list[int], text1_close_to_image0: bool, text_sim: torch.Tensor) -> LossInputs:
    """Scores image @ text.T are diag(.6) and 0 elsewhere, except s(image0, text1) = 0 (before) or 0.8 (after)."""
    image = torch.stack([_vec((0, 1.0)), _vec((1, 1.0)), _vec((2, 1.0))])
    text1 = _vec((1, 0.6), (0, 0.8)) if text1_close_to_image0 else _vec((1, 0.6), (4, 0.8))
    text = torch.stack([_vec((0, 0.6), (3, 0.8)), text1, _vec((2, 0.6), (5, 0.8))])
    return LossInputs(image=image, text=text, image_ids=torch.tensor(ids), epoch=1, text_sim=text_sim)


def _sim(s01: float, s02: float = 0.0, s12: float = 0.0) -> torch.Tensor:
    return torch.tensor([[1.0, s01, s02], [s01, 1.0, s12], [s02, s12, 1.0]])


def test_soft_negative_excluded_from_mining() -> None:
    # text_sim(0,1) = .9 > .7: the (0,1) pair is a soft negative. Margin .7, every other negative costs .1.
    # exclude: rows .1 each, columns .1 each -> .1 + .1 = .2 (plain VSE++ would give 2.2/3).
    loss = SoftNegativeTripletLoss(margin=0.7, threshold=0.7, mode="exclude")
    assert_close(loss(_masking_case([0, 1, 2], True, _sim(0.9)))["soft_triplet"], torch.tensor(0.2))
    # Below the threshold it is an ordinary (hard) negative: max(.7+.8-.6, .1) = .9 -> 2 * (.9+.1+.1)/3.
    assert_close(loss(_masking_case([0, 1, 2], True, _sim(0.6)))["soft_triplet"], torch.tensor(2.2 / 3))


def test_soft_negative_reduced_margin() -> None:
    # reduce: margin(0,1) = .7 * (1 - .9) = .07 -> anchor0 max(.07+.8-.6, .1) = .27; rows (.27+.1+.1)/3, same for
    # columns (text1's hardest image is image0 with the same .27).
    loss = SoftNegativeTripletLoss(margin=0.7, threshold=0.7, mode="reduce")
    assert_close(loss(_masking_case([0, 1, 2], True, _sim(0.9)))["soft_triplet"], torch.tensor(2 * 0.47 / 3))


def test_soft_negative_same_image_caption_is_not_a_negative() -> None:
    loss = SoftNegativeTripletLoss(margin=0.7)
    sim = _sim(0.1)
    shared = [loss(_masking_case([7, 7, 3], after, sim))["soft_triplet"] for after in (False, True)]
    distinct = [loss(_masking_case([0, 1, 2], after, sim))["soft_triplet"] for after in (False, True)]
    assert_close(shared[1], shared[0])
    assert distinct[1] > distinct[0] + 0.1


def test_soft_negative_bad_mode_names_choices() -> None:
    with pytest.raises(ValueError, match="valid: exclude, reduce"):
        SoftNegativeTripletLoss(mode="drop")  # type: ignore[arg-type]


def test_kendall_hand_computed() -> None:
    # Scores: diag .6, 0 elsewhere (before state). Labels rows: [1, .2, .5], [.2, 1, .5], [.5, .5, 1].
    # Row 0 in label order t0, t2, t1 -> scores .6, 0, 0; window 2 pairs: (t0,t2) ds .6, (t2,t1) ds 0, (t0,t1) ds .6.
    # Row 1 likewise. Row 2 order t2, t0, t1 -> .6, 0, 0; (t0,t1) has equal labels (tie, dropped): 2 pairs, ds .6.
    # Pair loss (1 - tanh(alpha * ds)) / 2 with alpha 1: a = (1 - tanh .6) / 2 for ds .6, .5 for ds 0.
    labels = torch.tensor([[1.0, 0.2, 0.5], [0.2, 1.0, 0.5], [0.5, 0.5, 1.0]])
    inputs = _masking_case([0, 1, 2], False, labels)
    a = (1 - math.tanh(0.6)) / 2
    loss = KendallRankLoss(alpha=1.0, window=2, hard_fraction=1.0, symmetric=False, min_label_gap=0.0)
    assert_close(loss(inputs)["kendall"], torch.tensor((6 * a + 2 * 0.5) / 8))
    # Hard mining keeps the 4 most violated of 8 pairs: .5, .5, a, a.
    mined = KendallRankLoss(alpha=1.0, window=2, hard_fraction=0.5, symmetric=False, min_label_gap=0.0)
    assert_close(mined(inputs)["kendall"], torch.tensor((2 * 0.5 + 2 * a) / 4))
    # Logistic surrogate: softplus(-ds) per pair.
    logistic = KendallRankLoss(
        alpha=1.0, window=2, hard_fraction=1.0, symmetric=False, min_label_gap=0.0, surrogate="logistic"
    )
    expected = (6 * math.log(1 + math.exp(-0.6)) + 2 * math.log(2)) / 8
    assert_close(logistic(inputs)["kendall"], torch.tensor(expected))


def test_kendall_lower_when_ordering_matches_labels() -> None:
    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(8, 16, generator=gen), dim=-1)
    text = F.normalize(torch.randn(8, 16, generator=gen), dim=-1)
    scores = image @ text.T
    agree = ((scores + 1) / 2).fill_diagonal_(1.0)  # labels ordered like the scores
    reverse = (1 - (scores + 1) / 2).fill_diagonal_(1.0)  # the opposite order
    loss = KendallRankLoss(symmetric=False, min_label_gap=0.0)
    ids = torch.arange(8)
    low = loss(LossInputs(image, text, ids, text_sim=agree))["kendall"]
    high = loss(LossInputs(image, text, ids, text_sim=reverse))["kendall"]
    assert low < 0.5 < high


def test_kendall_same_image_caption_ranks_as_positive() -> None:
    labels = torch.tensor([[1.0, 0.2, 0.5], [0.2, 1.0, 0.5], [0.5, 0.5, 1.0]])
    loss = KendallRankLoss(hard_fraction=1.0, min_label_gap=0.0)
    shared = [loss(_masking_case([7, 7, 3], after, labels))["kendall"] for after in (False, True)]
    distinct = [loss(_masking_case([0, 1, 2], after, labels))["kendall"] for after in (False, True)]
    # Same image: text1 is relevant to image0 (label forced to 1), so scoring it higher cannot hurt.
    assert shared[1] < shared[0]
    # Different images with label .2: text1 now outscores the better-labelled text2 for image0 -> worse.
    assert distinct[1] > distinct[0]


def test_kendall_gradients_and_bad_surrogate() -> None:
    labels = torch.tensor([[1.0, 0.2, 0.5], [0.2, 1.0, 0.5], [0.5, 0.5, 1.0]])
    inputs = _masking_case([0, 1, 2], True, labels)
    inputs.image.requires_grad_(True)
    inputs.text.requires_grad_(True)
    KendallRankLoss(min_label_gap=0.0)(inputs)["kendall"].backward()
    for grad in (inputs.image.grad, inputs.text.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="valid: tanh, logistic"):
        KendallRankLoss(surrogate="hinge")  # type: ignore[arg-type]


def test_bcls_returns_both_terms_and_weights_kendall() -> None:
    inputs = _masking_case([0, 1, 2], True, _sim(0.9, 0.5, 0.3))
    loss = BCLSLoss(
        kendall_weight=0.5, triplet_kwargs={"margin": 0.7, "labels": "caption"}, kendall_kwargs={"labels": "caption"}
    )
    terms = loss(inputs)
    assert set(terms) == {"soft_triplet", "kendall"}
    assert_close(terms["soft_triplet"], torch.tensor(0.2))
    assert_close(loss.total(terms), terms["soft_triplet"] + 0.5 * terms["kendall"])
