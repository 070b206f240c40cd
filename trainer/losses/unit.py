"""Structured hinge loss for multi-modal retrieval units: caption and image queries must find their fused unit."""

from __future__ import annotations

from torch import Tensor

from trainer.losses.base import EmbeddingLoss, LossInputs, register_loss
from trainer.losses.triplet import Reduction, anchor_hinge, check_reduction


@register_loss("unit_hinge")
class UnitHingeLoss(EmbeddingLoss):
    """VSE++ hardest-negative hinge (Faghri et al. 2018) from each query to the batch's retrieval units.

    A unit ``u_i`` is the fused embedding of (image i, caption i) that is indexed instead of (or besides) the bare
    image vector. Both query types must retrieve it: caption query ``t_i`` and image query ``v_i`` are the anchors,
    ``u_i`` their positive and every unit of another image a negative; units of the same image (fused with another
    caption) are never negatives. Only the query -> unit direction is trained, as that is the served search.

    ``unit_text_hinge = reduce_i max_{j: id_j != id_i} (margin + t_i.u_j - t_i.u_i)_+``, ``unit_image_hinge`` the
    same with ``v_i``. Requires ``unit``.

    Args:
        margin: Hinge margin (VSE++: 0.2).
        max_violation: Hardest negative after the warm-up (False: VSE0 sum over negatives).
        warmup_epochs: VSE0 epochs first (see ``VSEPPTripletLoss``).
        reduction: ``mean`` or ``sum`` over anchors.
    """

    term_names = ("unit_text_hinge", "unit_image_hinge")
    requires = frozenset({"unit"})

    def __init__(
        self, margin: float = 0.2, max_violation: bool = True, warmup_epochs: int = 1, reduction: Reduction = "mean"
    ) -> None:
        super().__init__()
        check_reduction(reduction)
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        self.margin = margin
        self.max_violation = max_violation
        self.warmup_epochs = warmup_epochs
        self.reduction: Reduction = reduction

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        unit = inputs.require("unit", type(self).__name__)
        pos = inputs.positive_mask()
        max_violation = self.max_violation and inputs.epoch >= self.warmup_epochs
        terms = {}
        for name, query in (("unit_text_hinge", inputs.text), ("unit_image_hinge", inputs.image)):
            cost = anchor_hinge(query @ unit.T, pos, self.margin, max_violation)
            terms[name] = cost.sum() if self.reduction == "sum" else cost.mean()
        return terms
