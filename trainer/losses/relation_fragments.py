"""HREM's fragment-level relations: fragment matching of a batch's image-caption pairs and the learned relevance."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)


def widen(x: Tensor) -> Tensor:
    """``x`` in at least float32 (half-precision activations under autocast; float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass(frozen=True)
class Fragments:
    """A batch's local fragments in the shared space, detached: HREM's ``img_emb_pre_pool`` / ``cap_emb_pre_pool``
    (the regions and words after the embedding projection, before pooling; ``lib/encoders.py``).

    Attributes:
        image: (B, R, D') image fragments (the grid cells), row i of image ``image_ids[i]``.
        text: (B, L, D') caption fragments (the tokens).
        text_mask: (B, L) mask of the valid tokens (padding: 0).
    """

    image: Tensor
    text: Tensor
    text_mask: Tensor


class FragmentScores(NamedTuple):
    """Fragment-level matching of every (image, caption) pair of a batch (``fragment_scores``)."""

    i2t: Tensor
    """(B, B) [image, caption]: the mean over the image's regions of each region's best token score."""
    t2i: Tensor
    """(B, B) [caption, image]: the mean over the caption's valid tokens of each token's best region score."""
    i2t_topk: Tensor
    """(B, B, K) [image, caption]: the K highest region scores (0 where there are fewer than K)."""
    t2i_topk: Tensor
    """(B, B, K) [caption, image]: the K highest token scores (0 where there are fewer than K valid tokens)."""


_CHUNK_ELEMENTS = 1 << 23
"""Word-region scores held at once by ``fragment_scores`` (its (captions, B, L, R) block is built in chunks of
captions, never at full size: 640 captions x 640 images x 32 tokens x 49 cells would be 2.6 GB)."""


def _topk_or_zero(values: Tensor, valid: Tensor, k: int) -> Tensor:
    """The k highest of the last dimension among the ``valid`` entries, padded with 0 where fewer are valid."""
    top = values.masked_fill(~valid, float("-inf")).topk(min(k, values.shape[-1]), dim=-1).values
    top = top.masked_fill(top.isinf(), 0.0)
    return F.pad(top, (0, k - top.shape[-1]))


def _caption_chunk_scores(words: Tensor, mask: Tensor, regions: Tensor, topk: int) -> tuple[Tensor, ...]:
    """``fragment_scores`` for a chunk of c captions against every image: (t2i, i2t, t2i_topk, i2t_topk), all with
    caption rows ((c, B) and (c, B, K))."""
    valid = mask[:, None, :, None]  # (c, 1, L, 1)
    # SCAN's thresholded word-region cosines (leaky ReLU 0.1); padding tokens score 0.
    sim = F.leaky_relu(torch.einsum("cld,brd->cblr", words, regions), negative_slope=0.1) * valid
    # Caption -> image: every token's best region, after SCAN's normalisation over the caption's tokens.
    best_region = F.normalize(sim, dim=2).amax(dim=3)  # (c, B, L)
    tokens = mask[:, None, :].expand_as(best_region)
    t2i = (best_region * tokens).sum(-1) / mask.sum(1, keepdim=True).clamp_min(1)
    # Image -> caption: every region's best valid token, after the normalisation over the image's regions.
    best_token = F.normalize(sim, dim=3).masked_fill(~valid, float("-inf")).amax(dim=2)  # (c, B, R)
    every_region = torch.ones_like(best_token, dtype=torch.bool)
    return (
        t2i,
        best_token.mean(-1),
        _topk_or_zero(best_region, tokens, topk),
        _topk_or_zero(best_token, every_region, topk),
    )


def fragment_scores(fragments: Fragments, topk: int = 10) -> FragmentScores:
    """Fragment-level matching of every (image, caption) pair, without gradient, as HREM's ``AdjacencyLearning``
    (``lib/mca.py``, ``scan=True``, ``img_len_use=False``) computes it.

    Word-region cosines of the L2-normalised fragments go through a leaky ReLU (slope 0.1). Caption -> image: the
    scores are L2-normalised over the caption's tokens (per region), each token keeps its best region, and the
    pair's score is the mean over the valid tokens (its top-K token scores feed the learned relevance). Image ->
    caption: normalised over the regions (per token), each region keeps its best valid token, mean over the
    regions (and its top-K region scores). Unlike HREM, padding tokens never enter (HREM lets them into the
    normalisation and the top-K when a caption is shorter than K); missing top-K entries are 0.

    Args:
        fragments: The batch's fragments.
        topk: K of the top-K scores (HREM's ``topk``: 10).
    """
    with torch.no_grad():
        mask = fragments.text_mask > 0
        length = max(1, int(mask.sum(1).max()))  # padding beyond the longest caption carries nothing
        mask = mask[:, :length]
        words = F.normalize(widen(fragments.text[:, :length]), dim=-1)
        regions = F.normalize(widen(fragments.image), dim=-1)
        step = max(1, _CHUNK_ELEMENTS // (regions.shape[0] * length * regions.shape[1]))
        chunks = [
            _caption_chunk_scores(words[s : s + step], mask[s : s + step], regions, topk)
            for s in range(0, words.shape[0], step)
        ]
        t2i, i2t, t2i_topk, i2t_topk = (torch.cat(parts, dim=0) for parts in zip(*chunks, strict=True))
    return FragmentScores(i2t.T, t2i, i2t_topk.transpose(0, 1), t2i_topk)


class LearnedRelevance(nn.Module):
    """HREM's learned inter-modal relevance (``lib/mca.py``, ``AdjacencyLearning``): per direction, a two-layer MLP
    maps a pair's top-K fragment scores to one value, plus the pair's mean fragment score (HREM's ``res=True``).

    Its inputs are detached fragment scores; it learns from the hinges through the attention logits it biases and
    from ``relevance_regulariser``, which pulls it towards the distance form of the embeddings.

    Args:
        topk: K (HREM: 10).
    """

    def __init__(self, topk: int = 10) -> None:
        super().__init__()
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.topk = topk
        self.i2t = nn.Sequential(nn.Linear(topk, topk), nn.ReLU(), nn.Linear(topk, 1))
        self.t2i = nn.Sequential(nn.Linear(topk, topk), nn.ReLU(), nn.Linear(topk, 1))

    def forward(self, scores: FragmentScores) -> tuple[Tensor, Tensor]:
        """(i2t (B, B) with image rows, t2i (B, B) with caption rows) relevances."""
        dtype = next(self.parameters()).dtype
        i2t = self.i2t(scores.i2t_topk.to(dtype)).squeeze(-1) + scores.i2t.to(dtype)
        t2i = self.t2i(scores.t2i_topk.to(dtype)).squeeze(-1) + scores.t2i.to(dtype)
        return i2t, t2i


def _relation_kl(relation: Tensor, guide: Tensor) -> Tensor:
    """Row-wise KL(softmax(relation) || softmax(guide)), gradient into ``relation`` only; mean over rows (HREM's
    ``AdjacencyLearning.kl_div`` at T = 1: ``F.kl_div(log_softmax(guide), softmax(relation), "batchmean")``)."""
    log_relation = F.log_softmax(relation, dim=-1)
    log_guide = F.log_softmax(guide.detach(), dim=-1)
    return (log_relation.exp() * (log_relation - log_guide)).sum(-1).mean()


def relevance_regulariser(i2t: Tensor, t2i: Tensor, image: Tensor, text: Tensor, sigma: float = 1.0) -> Tensor:
    """HREM's regulariser of the learned relevance (``AdjacencyLearning.relation_reg_loss``): the sum over both
    directions of the row-wise KL divergence from the distance form ``exp(-||image_i - text_j|| / sigma)`` of the
    (detached) embeddings to the learned relevances, each row a softmax over the other modality.

    Args:
        i2t: (B, B) learned relevance with image rows.
        t2i: (B, B) learned relevance with caption rows.
        image: (B, D) image embeddings.
        text: (B, D) caption embeddings.
        sigma: Distance scale.
    """
    guide = torch.exp(-torch.cdist(widen(image), widen(text)) / sigma)
    return _relation_kl(widen(i2t), guide) + _relation_kl(widen(t2i), guide.T)
