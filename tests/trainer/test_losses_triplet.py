"""Tests of the VSE++ and adaptive-margin triplet losses: hand-computed values, masking, VSE0 warm-up."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from trainer.losses import AdaptiveMarginTripletLoss, LossInputs, VSEPPTripletLoss
from trainer.losses.triplet import anchor_hinge, distance_weighted_choice, distance_weighted_hinge


def _vec(*pairs: tuple[int, float]) -> torch.Tensor:
    v = torch.zeros(6)
    for axis, value in pairs:
        v[axis] = value
    return v


def _masking_case(ids: list[int], text1_close_to_image0: bool, epoch: int = 1) -> LossInputs:
    """Scores image @ text.T are diag(.6) everywhere except s(image0, text1) = 0 (before) or 0.8 (after).

    image = e0, e1, e2; text0 = .6e0 + .8e3; text1 = .6e1 + .8e4 or .6e1 + .8e0; text2 = .6e2 + .8e5.
    """
    image = torch.stack([_vec((0, 1.0)), _vec((1, 1.0)), _vec((2, 1.0))])
    text1 = _vec((1, 0.6), (0, 0.8)) if text1_close_to_image0 else _vec((1, 0.6), (4, 0.8))
    text = torch.stack([_vec((0, 0.6), (3, 0.8)), text1, _vec((2, 0.6), (5, 0.8))])
    return LossInputs(image=image, text=text, image_ids=torch.tensor(ids), epoch=epoch)


def test_vsepp_hardest_negative_hand_computed() -> None:
    # margin .7, distinct ids, after state. Image anchors (rows): anchor0 max(.7+.8-.6, .7+0-.6) = .9,
    # anchor1 .7+0-.6 = .1, anchor2 .1 -> mean 1.1/3. Text anchors (columns): text1 sees image0 at .8 -> .9,
    # text0 and text2 .1 -> mean 1.1/3. Total 2.2/3.
    loss = VSEPPTripletLoss(margin=0.7)
    assert_close(loss(_masking_case([0, 1, 2], True))["triplet"], torch.tensor(2.2 / 3))
    assert_close(
        VSEPPTripletLoss(margin=0.7, reduction="sum")(_masking_case([0, 1, 2], True))["triplet"], torch.tensor(2.2)
    )


def test_vse0_warmup_sums_all_negatives() -> None:
    # epoch 0 < warmup 1: sum over negatives. Rows: anchor0 .9 + .1 = 1.0, anchor1 .1 + .1, anchor2 .1 + .1
    # -> 1.4/3; columns likewise 1.4/3. Total 2.8/3, different from the max-violation 2.2/3.
    loss = VSEPPTripletLoss(margin=0.7, warmup_epochs=1)
    warm = loss(_masking_case([0, 1, 2], True, epoch=0))["triplet"]
    hard = loss(_masking_case([0, 1, 2], True, epoch=1))["triplet"]
    assert_close(warm, torch.tensor(2.8 / 3))
    assert_close(hard, torch.tensor(2.2 / 3))
    assert not torch.isclose(warm, hard)
    # max_violation=False stays VSE0 forever.
    never = VSEPPTripletLoss(margin=0.7, max_violation=False)(_masking_case([0, 1, 2], True, epoch=5))["triplet"]
    assert_close(never, torch.tensor(2.8 / 3))


@pytest.mark.parametrize("epoch", [0, 1])
def test_vsepp_same_image_caption_is_not_a_negative(epoch: int) -> None:
    loss = VSEPPTripletLoss(margin=0.7)
    shared_before = loss(_masking_case([7, 7, 3], False, epoch))["triplet"]
    shared_after = loss(_masking_case([7, 7, 3], True, epoch))["triplet"]
    # Masked, margin .7: every negative scores 0 and every positive .6, so each (anchor, negative) costs .1.
    # Anchors 0, 1 (and texts 0, 1) have one negative (row 2); anchor 2 (text 2) has two (rows 0, 1).
    # Hardest (epoch 1): .1 per anchor -> .1 + .1 = .2. Sum (epoch 0): 2 * (.1 + .1 + .2) / 3.
    expected = 0.2 if epoch == 1 else 2 * (0.1 + 0.1 + 0.2) / 3
    assert_close(shared_before, torch.tensor(expected))
    assert_close(shared_after, shared_before)
    distinct_before = loss(_masking_case([0, 1, 2], False, epoch))["triplet"]
    distinct_after = loss(_masking_case([0, 1, 2], True, epoch))["triplet"]
    assert distinct_after > distinct_before + 0.1


def test_semi_hard_mining_takes_the_hardest_negative_below_the_positive() -> None:
    # Row 0: positive .5; negatives .9 (above the positive), .45 and .1 -> semi-hard is .45: .2 + .45 - .5 = .15
    # (the hardest overall would cost .2 + .9 - .5 = .6). Row 1: every negative (.7, .8) above the positive .3 ->
    # the least violating, .7: .2 + .7 - .3 = .6 (hardest: .7). Row 2: its only other column is the same image.
    scores = torch.tensor([[0.5, 0.9, 0.45, 0.1], [0.7, 0.3, 0.8, 0.8], [0.0, 0.0, 0.4, 0.9], [0.2, 0.1, 0.3, 0.6]])
    ids = torch.tensor([0, 1, 2, 2])
    pos = ids.unsqueeze(1) == ids.unsqueeze(0)
    pos[2, :2] = True  # row 2: no negative at all
    semi = anchor_hinge(scores, pos, 0.2, max_violation=True, semi_hard=True)
    hardest = anchor_hinge(scores, pos, 0.2, max_violation=True)
    assert_close(semi, torch.tensor([0.15, 0.6, 0.0, 0.0]))
    assert_close(hardest, torch.tensor([0.6, 0.7, 0.0, 0.0]))
    # The semi-hard choice is made on detached scores but the cost keeps its gradient.
    scores.requires_grad_(True)
    anchor_hinge(scores, pos, 0.2, max_violation=True, semi_hard=True).sum().backward()
    assert scores.grad is not None
    assert scores.grad[0, 2] == 1.0 and scores.grad[0, 0] == -1.0 and scores.grad[0, 1] == 0.0


def test_adaptive_margin_hand_computed() -> None:
    # margin .7 * (1 - text_sim); text_sim[0,1] = text_sim[1,0] = .5 -> margin .35 for that pair, .7 elsewhere.
    # Rows: anchor0 max(.35+.8-.6, .7+0-.6) = .55; anchor1 max(.35+0-.6 -> 0, .1) = .1; anchor2 .1 -> .75/3.
    # Columns: text0 max(.35+0-.6 -> 0, .1) = .1; text1 max(.35+.8-.6, .1) = .55; text2 .1 -> .75/3.
    inputs = _masking_case([0, 1, 2], True)
    inputs.text_sim = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]])
    loss = AdaptiveMarginTripletLoss(margin=0.7)
    out = loss(inputs)
    assert_close(out["adaptive_triplet"], torch.tensor(1.5 / 3))
    # The logged mean margin over the 6 negative pairs: (2 x .35 + 4 x .7) / 6; it weighs nothing in the total.
    assert_close(out["adaptive_mean_margin"], torch.tensor((2 * 0.35 + 4 * 0.7) / 6))
    assert_close(loss.total(out), out["adaptive_triplet"])


def test_adaptive_margin_masks_same_image() -> None:
    text_sim = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    loss = AdaptiveMarginTripletLoss(margin=0.7)
    values = {}
    for ids in ([7, 7, 3], [0, 1, 2]):
        for after in (False, True):
            inputs = _masking_case(ids, after)
            inputs.text_sim = text_sim
            values[(ids[0], after)] = loss(inputs)["adaptive_triplet"]
    assert_close(values[(7, True)], values[(7, False)])
    assert values[(0, True)] > values[(0, False)] + 0.1


def test_adaptive_margin_requires_text_sim() -> None:
    with pytest.raises(ValueError, match="text_sim"):
        AdaptiveMarginTripletLoss()(_masking_case([0, 1, 2], True))


def test_bad_reduction_names_choices() -> None:
    with pytest.raises(ValueError, match="valid: mean, sum"):
        VSEPPTripletLoss(reduction="max")  # type: ignore[arg-type]


def test_triplet_gradients() -> None:
    inputs = _masking_case([0, 1, 2], True)
    inputs.image.requires_grad_(True)
    inputs.text.requires_grad_(True)
    VSEPPTripletLoss()(inputs)["triplet"].backward()
    for grad in (inputs.image.grad, inputs.text.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_distance_weighted_choice_draws_by_inverse_distance_density() -> None:
    # Row 0 has negatives at s = 0 (d = sqrt 2) and s = .5 (d = 1), and one at s = -.5 (d = sqrt 3 > 1.5: never).
    # In dim 4: 1/q(d) = d^-2 (1 - d^2/4)^-1/2: d = 1 -> 1 / sqrt(.75) = 1.1547; d = sqrt 2 -> .5 / sqrt(.5) = .7071.
    scores = torch.tensor([[1.0, 0.0, 0.5, -0.5], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    not_negative = torch.eye(4, dtype=torch.bool)
    torch.manual_seed(0)
    draws = torch.stack(
        [distance_weighted_choice(scores, not_negative, dim=4, nonzero_loss_cutoff=1.5) for _ in range(4000)]
    )
    row0 = draws[:, 0]
    assert not (row0 == 3).any() and not (row0 == 0).any()
    share = (row0 == 2).float().mean().item()
    assert share == pytest.approx(1.1547 / (1.1547 + 0.7071), abs=0.03)
    # With the default cutoff 1.4, d = sqrt 2 is too far as well: only column 2 is ever drawn.
    assert (distance_weighted_choice(scores, not_negative, dim=4)[0] == 2).item()
    # No allowed negative (all too far or positives): the hardest negative.
    far = torch.tensor([[1.0, -0.9], [-0.9, 1.0]])
    assert distance_weighted_choice(far, torch.eye(2, dtype=torch.bool), dim=4).tolist() == [1, 0]


def test_distance_weighted_hinge_is_the_hinge_at_the_drawn_negative() -> None:
    # Two pairs: each anchor has one negative, so the draw is forced and the hinge equals VSE++'s.
    scores = torch.tensor([[0.6, 0.5], [0.1, 0.6]])
    pos = torch.eye(2, dtype=torch.bool)
    # i2t: (.2 + .5 - .6) = .1 and (.2 + .1 - .6) -> 0; t2i: (.2 + .1 - .6) -> 0 and (.2 + .5 - .6) = .1.
    assert_close(distance_weighted_hinge(scores, pos, 0.2, dim=8), torch.tensor(0.1))
    loss = VSEPPTripletLoss(margin=0.2, mining="distance_weighted")
    image = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    out = loss(LossInputs(image, text, torch.arange(4), epoch=1))["triplet"]
    assert out >= 0
    with pytest.raises(ValueError, match="mining"):
        VSEPPTripletLoss(mining="random")


def _refine_step(loss: AdaptiveMarginTripletLoss, t2: torch.Tensor, labels: tuple[float, float]) -> None:
    """One training forward on ids [0, 0, 1]: texts e0, .6e0 + .8e1 and ``t2``; text_sim (0, 2) and (1, 2) ``labels``.

    Its negative pairs are (0, 2) and (1, 2), each twice, so the batch's statistics are the mean and half the gap of
    two values."""
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    text = torch.stack([e0, 0.6 * e0 + 0.8 * e1, t2])
    sim = torch.eye(3)
    sim[0, 1] = sim[1, 0] = 1.0
    sim[0, 2] = sim[2, 0] = labels[0]
    sim[1, 2] = sim[2, 1] = labels[1]
    loss(LossInputs(image=text.clone(), text=text, image_ids=torch.tensor([0, 0, 1]), epoch=0, text_sim=sim))


def test_refined_margin_after_two_steps_hand_computed() -> None:
    loss = AdaptiveMarginTripletLoss(margin=0.7, refine_share=1.0, refine_epochs=2, momentum=0.5)
    loss.train()
    # Step 1: t2 = e1 -> learned cosines 0 and .8 (mean .4, std .4); labels .2 and .6 (mean .4, std .2).
    _refine_step(loss, torch.tensor([0.0, 1.0]), (0.2, 0.6))
    assert_close(loss.stats, torch.tensor([0.4, 0.4, 0.4, 0.2]))
    # Step 2: t2 = .6e0 + .8e1 -> cosines .6 and 1 (mean .8, std .2); labels .4, .4 (mean .4, std 0).
    # Momentum .5: (.5 * .4 + .5 * .8, .5 * .4 + .5 * .2, .4, .5 * .2 + .5 * 0) = (.6, .3, .4, .1).
    _refine_step(loss, torch.tensor([0.6, 0.8]), (0.4, 0.4))
    assert_close(loss.stats, torch.tensor([0.6, 0.3, 0.4, 0.1]))
    assert int(loss.updates) == 2

    # The 3x3 case at epoch 1: share a = 1 * 1/2. Learned cosines t0.t1 = .48, t0.t2 = t1.t2 = 0, calibrated to
    # .4 + .1 * (x - .6) / .3: .36 and .2. sim = .5 * text_sim + .5 * calibrated: (0, 1) .5 * .5 + .5 * .36 = .43,
    # (0, 2) and (1, 2) .5 * 0 + .5 * .2 = .1 -> margins .7 * .57 = .399 and .7 * .9 = .63.
    loss.eval()
    inputs = _masking_case([0, 1, 2], True, epoch=1)
    inputs.text_sim = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]])
    out = loss(inputs)
    # Scores: diag .6, s(image0, text1) = .8, others 0. Image anchors: anchor0 max(.399 + .8 - .6, .63 - .6) = .599,
    # anchor1 max(0, .03) = .03, anchor2 .03; text anchors the same by symmetry: 2 * .659 / 3.
    assert_close(out["adaptive_triplet"], torch.tensor(2 * 0.659 / 3))
    assert_close(out["adaptive_mean_margin"], torch.tensor((2 * 0.399 + 4 * 0.63) / 6))
    assert int(loss.updates) == 2  # evaluation leaves the running statistics alone


def test_refined_margin_starts_as_the_adaptive_margin_and_plain_one_keeps_no_state() -> None:
    # Epoch 0: share 0, so the refined loss equals the unrefined one (1.5 / 3, test_adaptive_margin_hand_computed).
    inputs = _masking_case([0, 1, 2], True, epoch=0)
    inputs.text_sim = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]])
    refined = AdaptiveMarginTripletLoss(margin=0.7, refine_share=0.5, warmup_epochs=0)
    assert_close(refined(inputs)["adaptive_triplet"], torch.tensor(1.5 / 3))
    assert int(refined.updates) == 1 and refined.share(2) == 0.25 and refined.share(9) == 0.5
    assert AdaptiveMarginTripletLoss().state_dict() == {}  # checkpoints of the plain adaptive margin are unchanged


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"refine_share": 1.5}, "refine_share"), ({"refine_epochs": 0}, "refine_epochs"), ({"momentum": 1.0}, "momentum")],
)
def test_refinement_arguments_are_checked(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AdaptiveMarginTripletLoss(**kwargs)  # type: ignore[arg-type]


def test_refined_margin_trains_saves_and_resumes_its_statistics(synthetic_data: Path, tmp_path: Path) -> None:
    from trainer.checkpoint import load_checkpoint
    from trainer.config import load_config
    from trainer.train import Trainer

    sets = [f"data={synthetic_data}", f"cache_dir={tmp_path / 'cache'}", "train_limit=0", "val_limit=0"]
    sets += ["losses={adaptive_margin_triplet: 1.0}", "with_unit=false"]
    sets += ["loss_kwargs={adaptive_margin_triplet: {refine_share: 0.5, refine_epochs: 1}}"]
    first = Trainer(load_config("tiny", None, [*sets, "epochs=1"]), tmp_path / "run").setup()
    first.fit()  # epoch 0: share 0, the statistics gather
    steps = first.steps_per_epoch
    loss = first.loss.losses["adaptive_margin_triplet"]
    assert isinstance(loss, AdaptiveMarginTripletLoss) and int(loss.updates) == steps
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt").state["loss"]
    assert torch.equal(saved["losses.adaptive_margin_triplet.stats"], loss.stats)
    resumed = Trainer(load_config("tiny", None, [*sets, "epochs=2"]), tmp_path / "run", resume=True).setup()
    again = resumed.loss.losses["adaptive_margin_triplet"]
    assert isinstance(again, AdaptiveMarginTripletLoss) and torch.equal(again.stats, loss.stats)
    resumed.fit()  # epoch 1: share .5, the refined margin trains
    assert int(again.updates) == 2 * steps and not torch.equal(again.stats, loss.stats)
