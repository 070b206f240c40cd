"""Local-embedding loss of the hierarchical option and the lexical (content-word Jaccard) labels it regresses."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from trainer.losses.base import EmbeddingLoss, LossInputs, register_loss
from trainer.losses.triplet import Reduction, check_reduction, vsepp_hinge

# Function words that carry no visual content; small on purpose (captions are short and plain).
_STOP_WORD_TEXT = """
a an the and or but of in on at to for from with without by over under near into onto off up down out
is are was were be been being has have had do does did this that these those there here it its
his her their they them he she we you my your our some any each other another very while as than then so just
also not no
"""
STOP_WORDS = frozenset(_STOP_WORD_TEXT.split())
_TOKEN = re.compile(r"[a-z0-9]+")


def _stem(word: str) -> str:
    # Crude plural stripping so "dogs"/"dog" and "buses"/"bus" match; no dictionary, by design.
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "sses", "xes", "zes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def content_words(caption: str) -> set[str]:
    """Lower-cased, punctuation-free, stop-word-free, plural-stripped word set of a caption."""
    # Single letters are possessive or contraction debris ("man's" -> "man", "s").
    return {_stem(w) for w in _TOKEN.findall(caption.lower()) if len(w) > 1 and w not in STOP_WORDS}


def lexical_similarity(captions_a: Sequence[str], captions_b: Sequence[str]) -> np.ndarray:
    """Jaccard similarity of content words for every pair of captions (pure Python/numpy, for data loaders).

    Args:
        captions_a: N captions.
        captions_b: M captions.

    Returns:
        (N, M) float32 in [0, 1]; 0 when both captions have no content word.
    """
    sets_a = [content_words(c) for c in captions_a]
    sets_b = [content_words(c) for c in captions_b]
    vocab = {w: k for k, w in enumerate(sorted(set().union(*sets_a, *sets_b)))}
    if not vocab:
        return np.zeros((len(sets_a), len(sets_b)), dtype=np.float32)

    def indicator(sets: list[set[str]]) -> np.ndarray:
        out = np.zeros((len(sets), len(vocab)), dtype=np.float32)
        for row, words in enumerate(sets):
            out[row, [vocab[w] for w in words]] = 1.0
        return out

    a, b = indicator(sets_a), indicator(sets_b)
    intersection = a @ b.T
    union = a.sum(1, keepdims=True) + b.sum(1, keepdims=True).T - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


@register_loss("local_similarity")
class LocalSimilarityLoss(EmbeddingLoss):
    """Local-embedding loss of the hierarchical option ("Learning hierarchical embedding space for image-text
    matching"): the local space should encode fine-grained, word-level agreement.

    ``S = normalize(image_local) @ normalize(text_local).T``. ``local_mse``: mean over the B x B matrix of
    ``(S[i, j] - y[i, j])^2`` with ``y = local_sim`` (lexical labels of caption i vs caption j), except that
    same-image pairs get ``y = 1``: they are true matches however differently the captions are worded, and a low
    target would push them apart like negatives. ``local_hinge``: VSE++ hinge on S (hardest negative, no warm-up
    needed since the regression term shapes the space from the start), same-image pairs never negatives.
    Requires ``image_local``, ``text_local`` and ``local_sim``.

    Args:
        margin: Hinge margin.
        max_violation: Hardest negative (True) or sum over negatives.
        reduction: ``mean`` or ``sum`` over anchors for the hinge.
        hinge_weight: Weight of ``local_hinge`` relative to ``local_mse`` in ``total``.
    """

    term_names = ("local_mse", "local_hinge")
    requires = frozenset({"image_local", "text_local", "local_sim"})

    def __init__(
        self, margin: float = 0.2, max_violation: bool = True, reduction: Reduction = "mean", hinge_weight: float = 1.0
    ) -> None:
        super().__init__()
        check_reduction(reduction)
        self.margin = margin
        self.max_violation = max_violation
        self.reduction: Reduction = reduction
        self.term_weights = {"local_hinge": hinge_weight}

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        name = type(self).__name__
        image_local = F.normalize(inputs.require("image_local", name), dim=-1)
        text_local = F.normalize(inputs.require("text_local", name), dim=-1)
        labels = inputs.require("local_sim", name)
        if image_local.shape != text_local.shape:
            raise ValueError(
                f"image_local and text_local must match; got {tuple(image_local.shape)} and {tuple(text_local.shape)}"
            )
        scores = image_local @ text_local.T
        pos = inputs.positive_mask()
        target = labels.to(scores).clamp(0.0, 1.0).masked_fill(pos, 1.0)
        mse = (scores - target).pow(2).mean()
        hinge = vsepp_hinge(scores, pos, self.margin, self.max_violation, self.reduction)
        return {"local_mse": mse, "local_hinge": hinge}
