"""Symmetric InfoNCE (CLIP) loss with a learnable, clamped temperature and image-id-aware negatives."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.losses.base import EmbeddingLoss, LossInputs, register_loss


def multi_positive_cross_entropy(logits: Tensor, pos_mask: Tensor) -> Tensor:
    """Row-wise cross-entropy with the diagonal as target and the other positives removed from the denominator.

    For row i, columns j != i with ``pos_mask[i, j]`` (other captions of the same image) are set to -inf: they are
    not the target, but pushing them away as negatives would contradict the labels.

    Args:
        logits: (B, B) scaled similarities; row = query, column = candidate; the diagonal is the matching pair.
        pos_mask: (B, B) bool, True for same-image pairs.

    Returns:
        Mean over rows of the cross-entropy.
    """
    eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    masked = logits.masked_fill(pos_mask & ~eye, float("-inf"))
    target = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(masked, target)


@register_loss("infonce")
class InfoNCELoss(EmbeddingLoss):
    """CLIP's symmetric contrastive loss (Radford et al. 2021, "Learning Transferable Visual Models From Natural
    Language Supervision"; van den Oord et al. 2018 for InfoNCE), as open_clip's ``ClipLoss``.

    ``0.5 * (CE_i2t + CE_t2i)`` over ``exp(logit_scale) * image @ text.T``, with same-image off-diagonal columns
    masked out of each denominator (see ``multi_positive_cross_entropy``).

    Args:
        init_temperature: Initial temperature; ``logit_scale`` starts at ``ln(1 / init_temperature)``
            (CLIP: 0.07).
        max_logit_scale: Upper bound on ``exp(logit_scale)`` (CLIP: 100).
        learnable: Whether ``logit_scale`` is a trained parameter (else a buffer).
    """

    term_names = ("infonce",)

    def __init__(self, init_temperature: float = 0.07, max_logit_scale: float = 100.0, learnable: bool = True) -> None:
        super().__init__()
        if init_temperature <= 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}")
        if max_logit_scale <= 1:
            raise ValueError(f"max_logit_scale must be > 1, got {max_logit_scale}")
        self.max_log_scale = math.log(max_logit_scale)
        init = torch.tensor(math.log(1.0 / init_temperature))
        self.logit_scale: Tensor
        if learnable:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)

    def scale(self) -> Tensor:
        """The multiplier applied to cosine similarities, ``exp(min(logit_scale, ln(max_logit_scale)))``."""
        # CLIP (Radford et al. 2021, sec. 2.5) clips the logit scale at 100 "to prevent scaling the logits by more
        # than 100 to avoid training instability": an unbounded scale keeps growing to sharpen the softmax and
        # blows up the gradients. Clamping in forward bounds it even if the trainer forgets to clamp the
        # parameter after each step (open_clip does `logit_scale.clamp_(0, ln 100)` there).
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamps the stored ``logit_scale`` in place to [0, ln(max_logit_scale)]; call after optimizer.step()."""
        self.logit_scale.clamp_(0.0, self.max_log_scale)

    def after_step(self) -> None:
        """Keeps the logit scale within [0, ln 100] (open_clip's bound) after each optimizer step."""
        self.clamp_()

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        pos = inputs.positive_mask()
        logits = self.scale().to(inputs.image.dtype) * inputs.image @ inputs.text.T
        i2t = multi_positive_cross_entropy(logits, pos)
        t2i = multi_positive_cross_entropy(logits.T, pos.T)
        return {"infonce": 0.5 * (i2t + t2i)}
