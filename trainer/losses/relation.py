"""HREM: batch-level relation module and loss (training only); its neighbour batches are in trainer.data.sampling."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.losses.base import NEG_LARGE, EmbeddingLoss, LossInputs, positive_mask, register_loss
from trainer.losses.triplet import Reduction, check_reduction, vsepp_hinge

if TYPE_CHECKING:
    from trainer.model import ModelSpec


class _CrossAttention(nn.Module):
    """Pre-norm residual cross-attention: queries of one modality attend to the other modality's batch."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)

    def forward(self, query: Tensor, context: Tensor, blocked: Tensor) -> Tensor:
        # A query whose every key is blocked would get NaN from softmax(-inf row); it attends to nothing instead.
        isolated = blocked.all(dim=1)
        safe_blocked = blocked & ~isolated.unsqueeze(1)
        kv = self.norm_kv(context).unsqueeze(0)
        out, _ = self.attn(self.norm_q(query).unsqueeze(0), kv, kv, attn_mask=safe_blocked, need_weights=False)
        out = out.squeeze(0).masked_fill(isolated.unsqueeze(1), 0.0)
        return query + out


class RelationModule(nn.Module):
    """HREM's instance-relation module (Fu et al. 2023, "Learning Semantic Relationship among Instances for
    Image-Text Matching", CVPR): the batch is treated as a sequence of instances.

    Intra-modal relations: one transformer-encoder layer per modality (self-attention over the batch's images,
    resp. captions). Inter-modal relations: cross-attention of images to captions and of captions to images.
    Output: L2-normalised enhanced embeddings. It is used only inside the training loss; retrieval serves the
    initial embeddings, so it is never exported.

    Cross-attention never lets an instance attend to the other modality's instances of the *same image*: the
    enhanced image would otherwise contain its own caption and match it trivially, so the relation triplet would
    teach the encoders nothing. (A trace of the own caption can still arrive in two hops, through the intra-modal
    mixing of the other captions; its weight is one attention share among B.)

    Args:
        dim: Embedding size D.
        num_heads: Attention heads (must divide ``dim``).
        ff_mult: Feed-forward width of the encoder layers, as a multiple of ``dim``.
        dropout: Dropout inside the attention and feed-forward blocks.
    """

    def __init__(self, dim: int, num_heads: int = 4, ff_mult: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide dim ({dim})")

        def encoder_layer() -> nn.TransformerEncoderLayer:
            return nn.TransformerEncoderLayer(
                dim, num_heads, dim_feedforward=ff_mult * dim, dropout=dropout, batch_first=True, norm_first=True
            )

        self.image_intra = encoder_layer()
        self.text_intra = encoder_layer()
        self.image_to_text = _CrossAttention(dim, num_heads, dropout)
        self.text_to_image = _CrossAttention(dim, num_heads, dropout)

    def forward(self, image: Tensor, text: Tensor, image_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Enhanced embeddings.

        Args:
            image: (B, D) initial image embeddings.
            text: (B, D) initial caption embeddings.
            image_ids: (B,) image ids; same-id cross-modal pairs are hidden from each other.

        Returns:
            (image, text) enhanced, each (B, D) and L2-normalised.
        """
        image_rel = self.image_intra(image.unsqueeze(0)).squeeze(0)
        text_rel = self.text_intra(text.unsqueeze(0)).squeeze(0)
        blocked = positive_mask(image_ids.to(image.device))
        image_out = self.image_to_text(image_rel, text_rel, blocked)
        text_out = self.text_to_image(text_rel, image_rel, blocked.T)
        return F.normalize(image_out, dim=-1), F.normalize(text_out, dim=-1)


def _masked_log_softmax(logits: Tensor, excluded: Tensor) -> Tensor:
    return F.log_softmax(logits.masked_fill(excluded, NEG_LARGE), dim=1)


def similarity_kl(student: Tensor, teacher: Tensor, pos_mask: Tensor, temperature: float) -> Tensor:
    """Row-wise KL(softmax(teacher / T) || softmax(student / T)), no gradient into ``teacher``; batch mean.

    Same-image off-diagonal columns are removed from both distributions, as from InfoNCE's denominator.
    """
    eye = torch.eye(student.shape[0], dtype=torch.bool, device=student.device)
    excluded = pos_mask & ~eye
    log_p = _masked_log_softmax(teacher.detach() / temperature, excluded)
    log_q = _masked_log_softmax(student / temperature, excluded)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


@register_loss("relation")
class RelationLoss(EmbeddingLoss):
    """HREM training loss (Fu et al. 2023): a VSE++ hinge on the relation-enhanced embeddings plus a consistency
    term that distils the enhanced similarity structure back into the initial (served) embeddings.

    ``relation_triplet``: ``vsepp_hinge`` on ``enhanced_image @ enhanced_text.T`` (hardest negative after
    ``warmup_epochs`` of VSE0, same-image pairs never negatives); trains the relation module and, through it, the
    encoders. ``relation_consistency``: mean of the two directions of
    ``KL(softmax(S_enhanced / T) || softmax(S_initial / T))`` with ``S_enhanced`` detached, so the initial
    embeddings learn the batch-relation-aware ranking without being able to pull the teacher toward them.
    Pair it with a loss on the initial embeddings (e.g. ``vsepp_triplet``) as HREM does.

    Args:
        dim: Embedding size D (builds the ``RelationModule``).
        margin: Hinge margin.
        max_violation: Hardest negative after the warm-up.
        warmup_epochs: VSE0 epochs.
        reduction: ``mean`` or ``sum`` over anchors.
        temperature: Softmax temperature of the consistency distributions.
        consistency_weight: Weight of ``relation_consistency`` relative to ``relation_triplet`` in ``total``.
        num_heads: Attention heads of the relation module.
        dropout: Dropout of the relation module.
        module: A prebuilt relation module (anything mapping (image, text, image_ids) to enhanced (image, text));
            overrides ``dim``, ``num_heads`` and ``dropout``.
    """

    batch = "caption"  # hardest negatives are other images' captions (VSE++ setting)

    term_names = ("relation_triplet", "relation_consistency")

    @classmethod
    def model_kwargs(cls, model: ModelSpec) -> dict[str, Any]:
        """The relation module works on the trained model's embeddings: ``dim`` is its embedding size."""
        return {"dim": model.dim}

    def __init__(
        self,
        dim: int = 512,
        margin: float = 0.2,
        max_violation: bool = True,
        warmup_epochs: int = 1,
        reduction: Reduction = "mean",
        temperature: float = 0.05,
        consistency_weight: float = 1.0,
        num_heads: int = 4,
        dropout: float = 0.0,
        module: nn.Module | None = None,
    ) -> None:
        super().__init__()
        check_reduction(reduction)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.relation = module if module is not None else RelationModule(dim, num_heads=num_heads, dropout=dropout)
        self.margin = margin
        self.max_violation = max_violation
        self.warmup_epochs = warmup_epochs
        self.reduction: Reduction = reduction
        self.temperature = temperature
        self.term_weights = {"relation_consistency": consistency_weight}

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        pos = inputs.positive_mask()
        image_enh, text_enh = self.relation(inputs.image, inputs.text, inputs.image_ids)
        enhanced = image_enh @ text_enh.T
        initial = inputs.image @ inputs.text.T
        max_violation = self.max_violation and inputs.epoch >= self.warmup_epochs
        triplet = vsepp_hinge(enhanced, pos, self.margin, max_violation, self.reduction)
        consistency = 0.5 * (
            similarity_kl(initial, enhanced, pos, self.temperature)
            + similarity_kl(initial.T, enhanced.T, pos.T, self.temperature)
        )
        return {"relation_triplet": triplet, "relation_consistency": consistency}
