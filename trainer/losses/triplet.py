"""VSE++ hinge-based triplet loss (hardest negative, VSE0 warm-up) and its semantically adaptive-margin variant."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from imgtxt.errors import ConfigError
from trainer.losses.base import EmbeddingLoss, LossInputs, register_loss

Reduction = Literal["mean", "sum"]
_REDUCTIONS = ("mean", "sum")


def check_reduction(reduction: str) -> None:
    """Raises a ConfigError (a ValueError) unless ``reduction`` is one of ``mean``, ``sum``."""
    if reduction not in _REDUCTIONS:
        raise ConfigError(f"unknown reduction {reduction!r}; valid: {', '.join(_REDUCTIONS)}")


def anchor_hinge(
    scores: Tensor,
    pos_mask: Tensor,
    margin: float | Tensor,
    max_violation: bool,
    exclude: Tensor | None = None,
    semi_hard: bool = False,
) -> Tensor:
    """Hinge cost of every row anchor against its column candidates; the diagonal is the anchor's positive.

    ``cost[i, j] = max(0, margin[i, j] + scores[i, j] - scores[i, i])`` for every column j that is a negative of
    row i (``~pos_mask[i, j]`` and not ``exclude[i, j]``); other captions of the same image are never negatives.

    Args:
        scores: (B, B) similarities, row = anchor (query), column = candidate.
        pos_mask: (B, B) bool, True for same-image pairs (never negatives).
        margin: Scalar margin, or (B, B) per-(anchor, negative) margins in the orientation of ``scores``.
        max_violation: True: keep only one negative per anchor (the hardest, or the semi-hard one); False: sum over
            all negatives (VSE0).
        exclude: Optional (B, B) bool of further pairs that must not count as negatives (e.g. soft negatives).
        semi_hard: With ``max_violation``, keep the hardest negative still scored *below* the positive instead of
            the hardest overall (FaceNet's semi-hard mining; BCLS's soft negative); an anchor whose every negative
            scores above its positive keeps the least violating one. The hardest negatives of a captioning data
            set are often captions that describe the anchor too; the semi-hard one is the hardest that is not
            already ranked above the positive.

    Returns:
        (B,) per-anchor cost.
    """
    positive = scores.diagonal().unsqueeze(1)
    cost = (margin + scores - positive).clamp(min=0)
    not_negative = pos_mask if exclude is None else pos_mask | exclude
    cost = cost.masked_fill(not_negative, 0.0)
    if max_violation and semi_hard:
        detached = scores.detach()
        below = ~not_negative & (detached < positive.detach())
        hardest_below = detached.masked_fill(~below, float("-inf")).argmax(dim=1)
        least_violating = detached.masked_fill(not_negative, float("inf")).argmin(dim=1)
        chosen = torch.where(below.any(dim=1), hardest_below, least_violating)
        # An anchor without any negative picks a masked column, whose cost is 0.
        return cost.gather(1, chosen.unsqueeze(1)).squeeze(1)
    # Costs are >= 0 and masked entries are 0, so an anchor without any negative contributes 0, not -inf.
    return cost.max(dim=1).values if max_violation else cost.sum(dim=1)


def vsepp_hinge(
    scores: Tensor,
    pos_mask: Tensor,
    margin: float | Tensor,
    max_violation: bool,
    reduction: Reduction = "mean",
    exclude: Tensor | None = None,
    semi_hard: bool = False,
) -> Tensor:
    """Bidirectional VSE++ hinge (Faghri et al. 2018): image-anchored (rows) plus text-anchored (columns).

    Args:
        scores: (B, B) ``image @ text.T``; the diagonal holds the matching pairs.
        pos_mask: (B, B) bool, True for same-image pairs.
        margin: Scalar, or (B, B) margins indexed [image row, text column] in both directions.
        max_violation: Hardest negative (True) or sum over negatives (False).
        reduction: ``mean`` or ``sum`` over anchors (each direction), then the two directions are added.
        exclude: Optional (B, B) bool [image row, text column] of pairs that are not negatives in either direction.
        semi_hard: Semi-hard instead of hardest negatives (see ``anchor_hinge``).

    Returns:
        Scalar loss.
    """
    check_reduction(reduction)
    margin_t = margin.T if isinstance(margin, Tensor) else margin
    exclude_t = exclude.T if exclude is not None else None
    i2t = anchor_hinge(scores, pos_mask, margin, max_violation, exclude, semi_hard)
    t2i = anchor_hinge(scores.T, pos_mask.T, margin_t, max_violation, exclude_t, semi_hard)
    if reduction == "sum":
        return i2t.sum() + t2i.sum()
    return i2t.mean() + t2i.mean()


MININGS = ("hardest", "distance_weighted")
"""How ``VSEPPTripletLoss`` picks each anchor's negative after the warm-up."""


def distance_weighted_choice(
    scores: Tensor, not_negative: Tensor, dim: int, cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4
) -> Tensor:
    """Each row anchor's negative column by distance-weighted sampling (Wu et al. 2017, "Sampling Matters in Deep
    Embedding Learning"; HREM's mining option).

    For unit vectors in ``dim`` dimensions the pairwise distance ``d = sqrt(2 - 2 s)`` of random pairs has density
    ``q(d) ∝ d^(dim-2) (1 - d²/4)^((dim-3)/2)``; a negative is drawn with probability ∝ ``1 / q(max(d, cutoff))``,
    so every distance is sampled about equally often instead of mostly the typical (easy) ones, and never one
    farther than ``nonzero_loss_cutoff`` (it has no loss). Rows without such a negative take their hardest one.

    Args:
        scores: (B, B) similarities of unit vectors, row = anchor (no gradient is taken).
        not_negative: (B, B) bool, pairs that are not negatives (positives, exclusions).
        dim: Embedding size.
        cutoff: Distances below it are weighted as it (the weight's pole at 0).
        nonzero_loss_cutoff: Negatives farther than it are never drawn.

    Returns:
        (B,) long column of each row's negative.
    """
    s = scores.detach().float()
    d = (2.0 - 2.0 * s).clamp(min=0.0).sqrt()
    dc = d.clamp(min=cutoff)
    log_w = (2.0 - dim) * dc.log() - ((dim - 3.0) / 2.0) * (1.0 - 0.25 * dc * dc).clamp(min=1e-8).log()
    allowed = ~not_negative & (d < nonzero_loss_cutoff)
    log_w = log_w.masked_fill(~allowed, float("-inf"))
    has = allowed.any(dim=1)
    weights = torch.softmax(log_w.masked_fill(~has.unsqueeze(1), 0.0), dim=1)
    drawn = torch.multinomial(weights, 1).squeeze(1)
    hardest = s.masked_fill(not_negative, float("-inf")).argmax(dim=1)
    return torch.where(has, drawn, hardest)


def distance_weighted_hinge(
    scores: Tensor, pos_mask: Tensor, margin: float, dim: int, reduction: Reduction = "mean"
) -> Tensor:
    """``vsepp_hinge`` with one distance-weighted negative per anchor (``distance_weighted_choice``) instead of the
    hardest, in both directions; an anchor without any negative costs 0."""
    check_reduction(reduction)
    total = scores.new_zeros(())
    for s, p in ((scores, pos_mask), (scores.T, pos_mask.T)):
        chosen = distance_weighted_choice(s, p, dim).unsqueeze(1)
        cost = (margin + s.gather(1, chosen) - s.diagonal().unsqueeze(1)).clamp(min=0).squeeze(1)
        cost = cost.masked_fill(p.gather(1, chosen).squeeze(1), 0.0)
        total = total + (cost.sum() if reduction == "sum" else cost.mean())
    return total


@register_loss("vsepp_triplet")
class VSEPPTripletLoss(EmbeddingLoss):
    """VSE++ triplet ranking loss with hardest negatives (Faghri et al. 2018, "VSE++: Improving Visual-Semantic
    Embeddings with Hard Negatives").

    ``sum_directions reduce_anchors [max_{negatives} (margin + s(anchor, negative) - s(anchor, positive))_+]``.
    For ``epoch < warmup_epochs`` the max over negatives is replaced by their sum (VSE0): hardest-negative mining
    from a random initialisation tends to collapse, so VSE∞ (Chen et al. 2021, "Learning the Best Pooling Strategy
    for Visual Semantic Embedding") and HREM (Fu et al. 2023) warm up with the summed hinge for the first epoch.

    Args:
        margin: Hinge margin (VSE++: 0.2).
        max_violation: Use the hardest negative after the warm-up (False: always VSE0).
        warmup_epochs: Epochs of VSE0 before switching to the hardest negative.
        reduction: ``mean`` (default) or ``sum`` over anchors. VSE++'s code sums over the batch, which ties the
            loss scale (and so the learning rate) to the batch size; the mean keeps weights comparable with
            InfoNCE in a ``CombinedLoss`` and is the same objective up to a factor B.
        mining: ``hardest`` (VSE++) or ``distance_weighted`` (``distance_weighted_hinge``) after the warm-up.
    """

    batch = "caption"  # hardest negatives are other images' captions (VSE++ setting)

    term_names: ClassVar[tuple[str, ...]] = ("triplet",)

    def __init__(
        self,
        margin: float = 0.2,
        max_violation: bool = True,
        warmup_epochs: int = 1,
        reduction: Reduction = "mean",
        mining: str = "hardest",
    ) -> None:
        super().__init__()
        check_reduction(reduction)
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if mining not in MININGS:
            raise ConfigError(f"unknown mining {mining!r}; valid: {', '.join(MININGS)}")
        self.mining = mining
        self.margin = margin
        self.max_violation = max_violation
        self.warmup_epochs = warmup_epochs
        self.reduction: Reduction = reduction

    def use_max_violation(self, epoch: int) -> bool:
        """Whether the hardest negative (rather than the VSE0 sum) is used at ``epoch``."""
        return self.max_violation and epoch >= self.warmup_epochs

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        scores = inputs.image @ inputs.text.T
        pos = inputs.positive_mask()
        max_violation = self.use_max_violation(inputs.epoch)
        if max_violation and self.mining == "distance_weighted":
            return {"triplet": distance_weighted_hinge(scores, pos, self.margin, scores.shape[1], self.reduction)}
        return {"triplet": vsepp_hinge(scores, pos, self.margin, max_violation, self.reduction)}


@register_loss("adaptive_margin_triplet")
class AdaptiveMarginTripletLoss(VSEPPTripletLoss):
    """VSE++ hinge whose margin shrinks for semantically close negatives, optionally refined during training.

    ``margin[i, j] = margin * (1 - sim[i, j])``: a negative caption that says nearly the same thing as the
    anchor's caption (sim -> 1) gets almost no margin, an unrelated one the full margin, so the embedding keeps
    graded semantic similarity instead of pushing every negative equally far ("Learning to embed semantic
    similarity for joint image-text retrieval", Malali & Keller, TPAMI 2022; cf. the semantic adaptive margin of
    Biten et al. 2022, "Is an Image Worth Five Sentences?"). Without refinement ``sim = text_sim``, the frozen
    sentence encoder's caption–caption label, which stands in for the similarity of the negative to the anchor
    image in both directions (``text_sim.T`` for text anchors). Hardest negative and VSE0 warm-up as
    ``VSEPPTripletLoss``; the hardest negative is the one with the largest margin-adjusted violation. Requires
    ``text_sim``.

    *Refinement* (``refine_share > 0``). The paper's abstract says only that the adaptive margin "is refined during
    the training phase", and that its embedding is learned so that distances in it approximate semantic
    similarity; it does not say how. This is the most literal reading of the two together, kept small: the
    similarity behind the margin moves from the pseudo-labels to the embedding being learned,
    ``sim = (1 - a) * text_sim + a * calibrated(text @ text.T)`` (the batch's own caption–caption cosines,
    detached), with the share ``a = refine_share * min(1, epoch / refine_epochs)`` growing linearly from 0 at the
    first epoch (a random embedding knows nothing yet). The learned cosines live on another scale than the labels
    (a joint space spreads unrelated captions differently from a sentence encoder), so ``calibrated`` maps them
    onto the labels' scale with running statistics over the negative pairs of the training batches:
    ``calibrated(x) = mu_label + sd_label * (x - mu_learned) / sd_learned``, each statistic an exponential moving
    average (``momentum``; the first training batch sets them). The refinement thus changes *which* negatives get
    a small margin, not the mean margin's scale, so the margin-matched ablation stays meaningful. Statistics are
    updated only in training mode and are saved with the loss's state.

    Args:
        margin: Margin for a completely unrelated negative (sim = 0).
        max_violation: See ``VSEPPTripletLoss``.
        warmup_epochs: See ``VSEPPTripletLoss``.
        reduction: See ``VSEPPTripletLoss``.
        refine_share: Final share ``a`` of the learned similarity in the margin's similarity (0: no refinement,
            the per-batch adaptive margin; 1: the learned similarity alone at the end of the ramp).
        refine_epochs: Epochs over which the share ramps up from 0 to ``refine_share`` (>= 1).
        momentum: Weight of the old value in each running statistic's update, in [0, 1).
    """

    batch = "caption"  # hardest negatives are other images' captions (VSE++ setting)

    term_names = ("adaptive_triplet", "adaptive_mean_margin")
    requires = frozenset({"text_sim"})

    stats: Tensor
    updates: Tensor

    def __init__(
        self,
        margin: float = 0.2,
        max_violation: bool = True,
        warmup_epochs: int = 1,
        reduction: Reduction = "mean",
        refine_share: float = 0.0,
        refine_epochs: int = 4,
        momentum: float = 0.99,
    ) -> None:
        super().__init__(margin, max_violation, warmup_epochs, reduction)
        if not 0.0 <= refine_share <= 1.0:
            raise ValueError(f"refine_share must be in [0, 1], got {refine_share}")
        if refine_epochs < 1:
            raise ValueError(f"refine_epochs must be >= 1, got {refine_epochs}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.refine_share, self.refine_epochs, self.momentum = refine_share, refine_epochs, momentum
        if refine_share > 0:
            # Only a refining loss has state, so the saved state of the plain adaptive margin is unchanged.
            # stats: running (mean, std) of the learned cosines, then of the labels, over negative pairs.
            self.register_buffer("stats", torch.zeros(4))
            self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        # Logged, not trained: the mean margin over the batch's negative pairs, the fixed margin it should be
        # compared with (the margin-matched ablation).
        self.term_weights = {"adaptive_mean_margin": 0.0}

    def share(self, epoch: int) -> float:
        """The learned similarity's share ``a`` of the margin's similarity at ``epoch`` (0-based)."""
        return self.refine_share * min(1.0, epoch / self.refine_epochs)

    def update_statistics(self, learned: Tensor, labels: Tensor) -> None:
        """Folds one batch's negative pairs (1-D learned cosines and their labels) into the running statistics."""
        if learned.numel() == 0:
            return
        x, y = learned.detach().float(), labels.detach().float()
        batch = torch.stack([x.mean(), x.std(unbiased=False), y.mean(), y.std(unbiased=False)]).to(self.stats)
        if int(self.updates) == 0:
            self.stats.copy_(batch)
        else:
            self.stats.mul_(self.momentum).add_((1.0 - self.momentum) * batch)
        self.updates += 1

    def calibrated(self, learned: Tensor) -> Tensor:
        """Learned cosines mapped onto the labels' scale by the running statistics."""
        mu_x, sd_x, mu_y, sd_y = self.stats.to(learned)
        return mu_y + sd_y * (learned - mu_x) / sd_x.clamp(min=1e-6)

    def margins(self, inputs: LossInputs) -> Tensor:
        """(B, B) margins [image row, text column] of a batch; updates the running statistics when training."""
        labels = inputs.require("text_sim", type(self).__name__).to(inputs.image).clamp(0.0, 1.0)
        sim = labels
        if self.refine_share > 0:
            learned = (inputs.text @ inputs.text.T).detach()
            negatives = ~inputs.positive_mask()
            if self.training:
                self.update_statistics(learned[negatives], labels[negatives])
            share = self.share(inputs.epoch)
            if share > 0 and int(self.updates) > 0:
                sim = (1.0 - share) * labels + share * self.calibrated(learned)
        return self.margin * (1.0 - sim.clamp(0.0, 1.0))

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        margin = self.margins(inputs)
        scores = inputs.image @ inputs.text.T
        pos = inputs.positive_mask()
        loss = vsepp_hinge(scores, pos, margin, self.use_max_violation(inputs.epoch), self.reduction)
        negatives = ~pos
        mean_margin = margin.detach()[negatives].mean() if negatives.any() else margin.new_zeros(())
        return {"adaptive_triplet": loss, "adaptive_mean_margin": mean_margin}
