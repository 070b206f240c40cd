"""HREM: batch-level relation module and loss (training only); fragment matching: relation_fragments."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.losses.base import (
    FRAGMENT_FIELDS,
    NEG_LARGE,
    EmbeddingLoss,
    LossInputs,
    register_loss,
    zero_loss,
)
from trainer.losses.relation_fragments import (
    Fragments,
    LearnedRelevance,
    fragment_scores,
    relevance_regulariser,
    widen,
)
from trainer.losses.triplet import Reduction, check_reduction, vsepp_hinge

if TYPE_CHECKING:
    from trainer.model import ModelSpec


class _Block(nn.Module):
    """Pre-norm transformer encoder block over a set (masked self-attention + feed-forward), LayerScale residuals.

    Each residual branch is scaled by a learned per-channel ``gamma`` (LayerScale, Touvron et al. 2021, "Going
    deeper with image transformers") that starts at ``layer_scale``, so the block starts close to the identity.
    """

    def __init__(self, dim: int, num_heads: int, ff_mult: int, dropout: float, layer_scale: float) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_mult * dim, dim)
        )
        self.gamma_attn = nn.Parameter(torch.full((dim,), layer_scale))
        self.gamma_ff = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: Tensor, blocked: Tensor) -> Tensor:
        """(N, D) set, (N, N) bool mask (True: query row may not attend to key column) or float bias added to the
        attention logits (-inf: may not attend) -> (N, D)."""
        h = self.norm_attn(x).unsqueeze(0)
        x = x + self.gamma_attn * self.attn(h, h, h, attn_mask=blocked, need_weights=False)[0].squeeze(0)
        return x + self.gamma_ff * self.ff(self.norm_ff(x))


def _top_fraction(scores: Tensor, fraction: float) -> Tensor:
    """Bool mask of each row's ``ceil(fraction * columns)`` highest scores (ties at the cut-off included)."""
    k = max(1, math.ceil(fraction * scores.shape[1]))
    return scores >= scores.topk(k, dim=1).values[:, -1:]


def connection_mask(image: Tensor, text: Tensor, fraction: float, cross: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Which instances of a batch may attend to which (HREM's "connection relation"), as a blocked mask.

    The set is ``[images; captions]`` (2B instances). Every instance is connected to itself and to the ``fraction``
    most similar instances of each modality, by the current (detached) embeddings for image-image and
    caption-caption, and by the inter-modal scores ``cross`` for image-caption: by default the global cosine
    ``image @ text.T``; HREM's fragment-level scores when given (``fragment_scores``). Returns the (2B, 2B) bool
    mask of *blocked* pairs (True: may not attend).

    Args:
        image: (B, D) image embeddings.
        text: (B, D) caption embeddings.
        fraction: Fraction of each modality every instance is connected to (``ceil(fraction * B)`` per row).
        cross: Optional (i2t, t2i) inter-modal scores: (B, B) with image rows, (B, B) with caption rows.
    """
    with torch.no_grad():
        i2t, t2i = cross if cross is not None else (image @ text.T, text @ image.T)
        connect = torch.cat(
            [
                torch.cat([_top_fraction(image @ image.T, fraction), _top_fraction(i2t, fraction)], dim=1),
                torch.cat([_top_fraction(t2i, fraction), _top_fraction(text @ text.T, fraction)], dim=1),
            ],
            dim=0,
        )
        connect |= torch.eye(connect.shape[0], dtype=torch.bool, device=connect.device)
    return ~connect


def relevance_bias(
    image: Tensor,
    text: Tensor,
    blocked: Tensor,
    weight: float,
    sigma: float = 1.0,
    learned: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """HREM's attention mask with relevance: ``weight * relevance`` for every connected pair of the
    ``[images; captions]`` set, ``-inf`` for blocked ones ((2B, 2B) float, added to the attention logits).

    The relevance is ``exp(-||a - b|| / sigma)`` of the current embeddings, without gradient (as the connections
    are), except for the inter-modal blocks when ``learned`` relevances are given (``LearnedRelevance``): those
    replace it, gradient included, as in HREM's ``GraphLoss`` (``mask_weight * relation_mask``).

    Args:
        image: (B, D) image embeddings.
        text: (B, D) caption embeddings.
        blocked: (2B, 2B) bool mask of blocked pairs (``connection_mask``).
        weight: HREM's ``mask_weight``.
        sigma: Distance scale.
        learned: Optional (i2t (B, B) with image rows, t2i (B, B) with caption rows) learned relevances.
    """
    with torch.no_grad():
        x = widen(torch.cat([image, text], dim=0))
        relevance = torch.exp(-torch.cdist(x, x) / sigma)
    if learned is not None:
        b = image.shape[0]
        i2t, t2i = (r.to(relevance.dtype) for r in learned)
        relevance = torch.cat(
            [torch.cat([relevance[:b, :b], i2t], dim=1), torch.cat([t2i, relevance[b:, b:]], dim=1)], dim=0
        )
    return (weight * relevance).to(image.dtype).masked_fill(blocked, float("-inf"))


class Enhanced(NamedTuple):
    """What the relation module returns."""

    image: Tensor
    """(B, D) L2-normalised relation-enhanced image embeddings."""
    text: Tensor
    """(B, D) L2-normalised relation-enhanced caption embeddings."""
    regulariser: Tensor
    """Scalar ``relevance_regulariser`` of the learned relevance (0 without one)."""


CONNECTIONS = ("similarity", "fragment", "self")
"""Which instances the relation module lets each instance attend to (``RelationModule``)."""

RELEVANCES = ("fixed", "learned")
"""How the relation module's relevance bias is formed (``RelationModule``)."""

AGGREGATES = ("sum", "mean")
"""How ``RelationLoss`` combines its three relation hinges."""


class RelationModule(nn.Module):
    """HREM's instance-relation module (Fu et al. 2023, "Learning Semantic Relationship among Instances for
    Image-Text Matching", CVPR; its code: github.com/CrossmodalGroup/HREM, ``graph_lib.GraphLoss``).

    The batch's images and captions form one set of 2B instances; a transformer-encoder block lets each attend to
    the instances it is connected to (``connection_mask``: itself and the most similar fraction of each modality,
    so intra-modal and inter-modal relations in one attention). Output: L2-normalised enhanced embeddings. It is
    used only inside the training loss; retrieval serves the initial embeddings, so it is never exported.

    Two choices of the first version made it collapse on Flickr8k, and are the reason for this one's shape:
    - *Scale*: a unit-norm D-vector has entries of about 1/sqrt(D) (0.044 at D = 512), while a residual branch over
      LayerNorm-ed inputs returns entries of about 1; added to the raw embedding, the branches drowned the instance.
      So the residual stream carries ``sqrt(D) * embedding`` and each branch is scaled by a LayerScale starting at
      ``layer_scale``: the module starts as the identity and learns relations as a correction of the instance.
    - *Hidden positives*: the first version hid every same-image pair from cross-attention (so the enhanced image
      could not "contain" its caption). But then the positive is the one pair that can never see each other, while
      every negative pair can: attention raises negative similarities and never the positive one, the hardest
      negative is the caption the image attended to, and the hinge on the enhanced embeddings can only be lowered
      by making attention useless. HREM connects by similarity, positives included, and ties the enhanced
      embeddings to the initial ones with cross terms (``RelationLoss``), which is what this does.

    Args:
        dim: Embedding size D.
        num_heads: Attention heads (must divide ``dim``).
        ff_mult: Feed-forward width, as a multiple of ``dim``.
        dropout: Dropout inside the attention and feed-forward blocks.
        layer_scale: Initial LayerScale of every residual branch.
        connect_fraction: Fraction of each modality every instance attends to (HREM's threshold: 0.5).
        num_layers: Transformer-encoder blocks (HREM: 1).
        connections: ``similarity``: connections by the global cosine of the embeddings (``connection_mask``);
            ``fragment``: HREM's inter-modal connections, from fragment-level matching of the batch's grid cells
            and tokens (``fragment_scores``; intra-modal ones by the global cosine, as in HREM's
            ``AdjacencyModel``); or ``self``: the control in which every instance attends only to itself, so the
            module is a per-instance transform with the same parameters and the loss the same extra hinges, but no
            relation between instances.
        relevance_weight: HREM's relevance relation as a bias on the attention logits of connected pairs,
            ``relevance_weight * relevance`` (``relevance_bias``; 0: off, HREM's ``mask_weight`` 1).
        sigma: Distance scale of the relevance.
        relevance: ``fixed``: every block's relevance is the distance form ``exp(-||a - b|| / sigma)`` of the
            detached embeddings; ``learned``: the inter-modal blocks use HREM's learned relevance
            (``LearnedRelevance``, from the top-K fragment scores) and ``Enhanced.regulariser`` pulls it towards the
            distance form (``relevance_regulariser``). Needs ``relevance_weight`` > 0.
        topk: K of the learned relevance's top-K fragment scores (HREM: 10).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        ff_mult: int = 2,
        dropout: float = 0.1,
        layer_scale: float = 0.1,
        connect_fraction: float = 0.5,
        num_layers: int = 1,
        connections: str = "similarity",
        relevance_weight: float = 0.0,
        sigma: float = 1.0,
        relevance: str = "fixed",
        topk: int = 10,
    ) -> None:
        super().__init__()
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.relevance_weight, self.sigma = relevance_weight, sigma
        if dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide dim ({dim})")
        if connections not in CONNECTIONS:
            raise ValueError(f"connections must be one of {CONNECTIONS}, got {connections!r}")
        self.connections = connections
        check_relevance(relevance, relevance_weight, connections)
        self.learned = LearnedRelevance(topk) if relevance == "learned" else None
        self.topk = topk
        if not 0.0 < connect_fraction <= 1.0:
            raise ValueError(f"connect_fraction must be in (0, 1], got {connect_fraction}")
        self.scale = math.sqrt(dim)
        self.connect_fraction = connect_fraction
        self.blocks = nn.ModuleList(_Block(dim, num_heads, ff_mult, dropout, layer_scale) for _ in range(num_layers))

    @property
    def needs_fragments(self) -> bool:
        """Whether ``forward`` needs the batch's fragments (fragment connections or the learned relevance)."""
        return self.connections == "fragment" or self.learned is not None

    def forward(self, image: Tensor, text: Tensor, image_ids: Tensor, fragments: Fragments | None = None) -> Enhanced:
        """Enhanced embeddings.

        Args:
            image: (B, D) initial image embeddings.
            text: (B, D) initial caption embeddings.
            image_ids: (B,) image ids (unused: connections follow similarity, as HREM's do).
            fragments: The batch's fragments; required when ``needs_fragments``.

        Returns:
            The enhanced (image, text), each (B, D) and L2-normalised, and the learned relevance's regulariser.
        """
        regulariser = zero_loss(image)
        scores = None
        if self.needs_fragments:
            if fragments is None:
                raise ValueError(
                    f"RelationModule(connections={self.connections!r}, relevance="
                    f"{'learned' if self.learned is not None else 'fixed'!r}) needs the batch's fragments"
                )
            scores = fragment_scores(fragments, self.topk)
        if self.connections == "self":
            blocked = ~torch.eye(2 * image.shape[0], dtype=torch.bool, device=image.device)
        else:
            cross = (scores.i2t, scores.t2i) if scores is not None and self.connections == "fragment" else None
            blocked = connection_mask(image, text, self.connect_fraction, cross)
        mask: Tensor = blocked
        if self.relevance_weight:
            learned = None
            if self.learned is not None and scores is not None:
                learned = self.learned(scores)
                regulariser = relevance_regulariser(learned[0], learned[1], image, text, self.sigma)
            mask = relevance_bias(image, text, blocked, self.relevance_weight, self.sigma, learned)
        x = torch.cat([image, text], dim=0) * self.scale
        for block in self.blocks:
            x = block(x, mask)
        image_out, text_out = x.split(image.shape[0], dim=0)
        return Enhanced(F.normalize(image_out, dim=-1), F.normalize(text_out, dim=-1), regulariser)


def check_relevance(relevance: str, relevance_weight: float, connections: str) -> None:
    """Raises a ValueError naming the choices when ``relevance`` is not one of ``RELEVANCES`` or cannot act."""
    if relevance not in RELEVANCES:
        raise ValueError(f"relevance must be one of {RELEVANCES}, got {relevance!r}")
    if relevance == "learned" and (relevance_weight <= 0 or connections == "self"):
        raise ValueError(
            "relevance='learned' biases the attention logits of connected image-caption pairs: it needs "
            f"relevance_weight > 0 (got {relevance_weight}) and connections 'similarity' or 'fragment' "
            f"(got {connections!r})"
        )


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
    """HREM training loss (Fu et al. 2023): VSE++ hinges on the relation-enhanced embeddings, each paired with the
    initial (served) embeddings of the other side as well as with its own enhanced side, as HREM's ``GraphLoss``.

    ``relation_triplet``: the sum of ``vsepp_hinge`` on ``image @ text_enh.T``, ``image_enh @ text.T`` and
    ``image_enh @ text_enh.T`` (hardest negative when the base hinge uses it, same-image pairs never negatives), as
    ``GraphLoss`` adds them to its base loss: with ``vsepp_triplet`` at weight 1 the relation hinges weigh 3 : 1
    against the base hinge (``aggregate: mean``, the form of the earlier tables, weighs them 1 : 1). The
    cross terms keep the enhanced embeddings in the served space, so the relation gradient reaches the encoders as
    "match the batch-aware version of the other side", not as a free-floating space of its own.
    ``relation_consistency`` (optional, weight 0 by default, not in HREM): mean of the two directions of
    ``KL(softmax(S_enhanced / T) || softmax(S_initial / T))`` with ``S_enhanced`` detached.
    ``relation_regulariser`` (``relevance: learned`` only, else 0; weight ``regulariser_weight``, HREM's 10):
    ``relevance_regulariser`` of the learned relevance, as ``GraphLoss`` adds ``reg_loss_weight * reg_loss``.
    The terms are 0 before ``start_epoch`` (HREM trains the base loss alone for its first iterations: relations
    between instances of an untrained space are noise). Pair it with a loss on the initial embeddings (e.g.
    ``vsepp_triplet``) as HREM does.

    Args:
        dim: Embedding size D (builds the ``RelationModule``).
        margin: Hinge margin.
        max_violation: Hardest negative from ``warmup_epochs`` on (else the VSE0 sum).
        warmup_epochs: VSE0 epochs.
        start_epoch: First epoch (0-based) with relation terms.
        reduction: ``mean`` or ``sum`` over anchors.
        temperature: Softmax temperature of the consistency distributions.
        consistency_weight: Weight of ``relation_consistency`` relative to ``relation_triplet`` in ``total``.
        num_heads: Attention heads of the relation module.
        dropout: Dropout of the relation module.
        connect_fraction: See ``RelationModule``.
        connections: See ``RelationModule`` (``self``: the control arm without relations).
        aggregate: ``sum`` (HREM) or ``mean`` of the three relation hinges.
        relevance_weight: See ``RelationModule`` (0: no relevance bias).
        relevance: ``fixed`` (the distance form) or ``learned`` (HREM's learned inter-modal relevance, with
            ``relation_regulariser``); see ``RelationModule``.
        topk: See ``RelationModule``.
        regulariser_weight: Weight of ``relation_regulariser`` in ``total`` (HREM's ``reg_loss_weight``: 10).
        module: A prebuilt relation module (anything mapping (image, text, image_ids, fragments) to ``Enhanced``;
            it gets the batch's fragments when its ``needs_fragments`` is true); overrides ``dim``, ``num_heads``,
            ``dropout``, ``connect_fraction``, ``connections``, ``relevance_weight``, ``relevance`` and ``topk``.
    """

    batch = "caption"  # hardest negatives are other images' captions (VSE++ setting)

    term_names = ("relation_triplet", "relation_consistency", "relation_regulariser")

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
        start_epoch: int = 1,
        reduction: Reduction = "mean",
        temperature: float = 0.05,
        consistency_weight: float = 0.0,
        num_heads: int = 4,
        dropout: float = 0.1,
        connect_fraction: float = 0.5,
        connections: str = "similarity",
        aggregate: str = "sum",
        relevance_weight: float = 0.0,
        relevance: str = "fixed",
        topk: int = 10,
        regulariser_weight: float = 10.0,
        module: nn.Module | None = None,
    ) -> None:
        super().__init__()
        check_reduction(reduction)
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        self.aggregate = aggregate
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if start_epoch < 0 or warmup_epochs < 0:
            raise ValueError(f"start_epoch and warmup_epochs must be >= 0, got {start_epoch}, {warmup_epochs}")
        self.relation = (
            module
            if module is not None
            else RelationModule(
                dim,
                num_heads=num_heads,
                dropout=dropout,
                connect_fraction=connect_fraction,
                connections=connections,
                relevance_weight=relevance_weight,
                relevance=relevance,
                topk=topk,
            )
        )
        self.fragments = bool(getattr(self.relation, "needs_fragments", False))
        self.margin = margin
        self.max_violation = max_violation
        self.warmup_epochs = warmup_epochs
        self.start_epoch = start_epoch
        self.reduction: Reduction = reduction
        self.temperature = temperature
        self.term_weights = {"relation_consistency": consistency_weight, "relation_regulariser": regulariser_weight}

    def needs(self) -> frozenset[str]:
        """The fragment fields (``image_fragments``, ``text_fragments``, ``text_fragment_mask``) when the relation
        module matches fragments (``connections: fragment`` or ``relevance: learned``); nothing otherwise."""
        return FRAGMENT_FIELDS if self.fragments else frozenset()

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        if inputs.epoch < self.start_epoch:
            zero = zero_loss(inputs.image)
            return {"relation_triplet": zero, "relation_consistency": zero, "relation_regulariser": zero}
        pos = inputs.positive_mask()
        image, text = inputs.image, inputs.text
        fragments = None
        if self.fragments:
            fragments = Fragments(
                inputs.require("image_fragments", "relation"),
                inputs.require("text_fragments", "relation"),
                inputs.require("text_fragment_mask", "relation"),
            )
        image_enh, text_enh, regulariser = self.relation(image, text, inputs.image_ids, fragments)
        max_violation = self.max_violation and inputs.epoch >= self.warmup_epochs
        hinges = torch.stack(
            [
                vsepp_hinge(a @ b.T, pos, self.margin, max_violation, self.reduction)
                for a, b in ((image, text_enh), (image_enh, text), (image_enh, text_enh))
            ]
        )
        triplet = hinges.sum() if self.aggregate == "sum" else hinges.mean()
        enhanced, initial = image_enh @ text_enh.T, image @ text.T
        consistency = 0.5 * (
            similarity_kl(initial, enhanced, pos, self.temperature)
            + similarity_kl(initial.T, enhanced.T, pos.T, self.temperature)
        )
        return {"relation_triplet": triplet, "relation_consistency": consistency, "relation_regulariser": regulariser}
