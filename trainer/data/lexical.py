"""Lexical neighbour batches: groups of images whose captions share content words, for the hierarchical option's
local hinge, and the measure of how much local (lexical) similarity a batch holds."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy import sparse

from trainer.data.captions import CaptionTable
from trainer.losses.hierarchical import content_words, lexical_similarity

logger = logging.getLogger(__name__)


def image_words(table: CaptionTable) -> sparse.csr_matrix:
    """(n_images, vocabulary) binary matrix: the content words of each image's captions together."""
    words = [set[str]() for _ in table.images]
    for caption, image in zip(table.captions, table.caption_image, strict=True):
        words[int(image)] |= content_words(caption)
    vocab = {w: k for k, w in enumerate(sorted(set().union(*words)))}
    rows = [i for i, ws in enumerate(words) for _ in ws]
    cols = [vocab[w] for ws in words for w in sorted(ws)]
    shape = (len(words), len(vocab))
    return sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=shape)


class LexicalNeighbours:
    """Image-major batches in which every image comes with a few others whose captions share its content words.

    The local hinge of the hierarchical option (``local_similarity``) separates an image's captions from other
    images' captions in the local space, whose labels are the captions' content-word overlap; it only meets
    informative negatives when a batch holds other images' captions that share content words. Random batches hold
    few that share much (``local_label_share``). Here the images' content-word sets (the union over their captions)
    are built once; each epoch, images are visited in a seeded random order, and each image not yet placed opens a
    group with the ``group_size - 1`` unplaced images of the highest content-word Jaccard with it (ties: the lowest
    index). The groups, in a seeded random order, are dealt whole into the epoch's steps (consecutive runs of
    groups, step sizes within one group of each other), so every image appears exactly once per epoch and the step
    count stays fixed. Deterministic for a fixed seed and caption table.

    Args:
        table: The training split's captions.
        group_size: Images per group (>= 2): each image and ``group_size - 1`` lexical neighbours.
    """

    def __init__(self, table: CaptionTable, group_size: int) -> None:
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2, got {group_size}")
        self.group_size = group_size
        self.words = image_words(table)
        self.words_t = self.words.T.tocsr()
        self.sizes = np.asarray(self.words.sum(axis=1)).ravel()

    def jaccard(self, image: int) -> np.ndarray:
        """(n_images,) content-word Jaccard similarity of ``image`` with every image (0 where both have none)."""
        inter = np.asarray((self.words[image] @ self.words_t).todense()).ravel()
        union = self.sizes[image] + self.sizes - inter
        return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)

    def groups(self, seed: int) -> list[list[int]]:
        """Disjoint groups of ``group_size`` image indices covering every image (the last may be smaller)."""
        n = self.words.shape[0]
        rng = np.random.default_rng(seed)
        free = np.ones(n, dtype=bool)
        out: list[list[int]] = []
        for image in rng.permutation(n).tolist():
            if not free[image]:
                continue
            free[image] = False
            sim = np.where(free, self.jaccard(image), -1.0)
            take = np.argsort(-sim, kind="stable")[: min(self.group_size - 1, int(free.sum()))]
            free[take] = False
            out.append([image, *take.tolist()])
        return out

    def batches(self, num_steps: int, seed: int) -> list[np.ndarray]:
        """The epoch's ``num_steps`` batches of image indices: the groups of ``seed``, dealt whole in a seeded order.

        Raises:
            ValueError: Fewer groups than steps (``group_size`` above the batch size).
        """
        groups = self.groups(seed)
        if not 1 <= num_steps <= len(groups):
            raise ValueError(f"cannot deal {len(groups)} groups of {self.group_size} images into {num_steps} steps")
        order = np.random.default_rng(seed).permutation(len(groups))
        steps = np.array_split(order, num_steps)
        out = [np.asarray([i for g in step for i in groups[g]], dtype=np.int64) for step in steps]
        logger.debug("lexical neighbour batches: %d groups in %d steps", len(groups), num_steps)
        return out


LABEL_SHARE_KEYS = (
    "share_above_0",
    "share_at_threshold",
    "mean_label",
    "anchors_with_close_negative",
    "mean_nearest_label",
)
"""The figures of ``local_label_share``."""


def local_label_share(table: CaptionTable, batches: Sequence[np.ndarray], threshold: float = 0.3) -> dict[str, float]:
    """How much local (lexical) similarity image-major batches hold for the local hinge (labels:
    ``lexical_similarity``, the local loss's ``local_sim``).

    Over every batch's pairs of captions of *different* images: the share with a label above 0
    (``share_above_0``), the share at ``threshold`` or more (``share_at_threshold``) and the mean label. Per
    caption, what its hardest local negative can be: the share of captions whose batch holds another image's
    caption at ``threshold`` or more (``anchors_with_close_negative``), and the mean over captions of the
    highest label among other images' captions (``mean_nearest_label``).

    Args:
        table: The captions the batches' image indices refer to.
        batches: Batches of image indices (each with all its captions, as sampling=image trains them).
        threshold: The label counted as a close lexical neighbour.

    Returns:
        The ``LABEL_SHARE_KEYS`` figures over all batches (fractions in [0, 1]).
    """
    pairs = above = close = anchors = anchors_close = 0
    total = best = 0.0
    for batch in batches:
        rows = table.captions_of(np.asarray(batch, dtype=np.int64))
        captions = [table.captions[r] for r in rows]
        labels = lexical_similarity(captions, captions)
        owner = table.caption_image[rows]
        different = owner[:, None] != owner[None, :]
        other = labels[different]
        nearest = np.where(different, labels, -1.0).max(axis=1)  # each caption's closest other-image caption
        anchors += len(rows)
        anchors_close += int((nearest >= threshold).sum())
        best += float(nearest.clip(min=0.0).sum())
        pairs += other.size
        above += int((other > 0).sum())
        close += int((other >= threshold).sum())
        total += float(other.sum())
    if pairs == 0:
        return dict.fromkeys(LABEL_SHARE_KEYS, 0.0)
    return {
        "share_above_0": above / pairs,
        "share_at_threshold": close / pairs,
        "mean_label": total / pairs,
        "anchors_with_close_negative": anchors_close / anchors,
        "mean_nearest_label": best / anchors,
    }
