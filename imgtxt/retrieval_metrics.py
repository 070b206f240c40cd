"""Retrieval metrics in numpy (no torch): R@K both ways from image ids, rSum, ranks (graded judgments: evaluation)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

KS = (1, 5, 10)


def _ranks_of_positives(sim: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """1-based rank of the best-ranked positive in each row (ties counted pessimistically: a tie ranks above)."""
    best_pos = np.where(positive, sim, -np.inf).max(axis=1, keepdims=True)
    # Rank = 1 + number of negatives scoring at least as high as the best positive.
    return 1 + ((sim >= best_pos) & ~positive).sum(axis=1)


def retrieval_metrics(sim: np.ndarray, text_image_ids: Sequence[int] | np.ndarray) -> dict[str, float]:
    """Standard image–text retrieval metrics from a similarity matrix.

    Image->text: an image's rank is the best rank among all of its captions. Text->image: per caption, the rank of
    its image. Positives are found from image ids, never from caption order.

    Args:
        sim: (n_images, n_texts) similarities; row i is the image with id i.
        text_image_ids: (n_texts,) the image id (row of `sim`) each caption describes.

    Returns:
        `i2t_r1/5/10`, `t2i_r1/5/10` (percent), `rsum`, `i2t_medr`, `i2t_meanr`, `t2i_medr`, `t2i_meanr`.

    Raises:
        ValueError: Shape mismatch, an id outside [0, n_images), or an image without any caption.
    """
    sim = np.asarray(sim, dtype=np.float64)
    ids = np.asarray(text_image_ids, dtype=np.int64)
    if sim.ndim != 2 or ids.shape != (sim.shape[1],):
        raise ValueError(f"sim must be (n_images, n_texts) and ids (n_texts,); got {sim.shape} and {ids.shape}")
    n_images = sim.shape[0]
    if ids.size and (ids.min() < 0 or ids.max() >= n_images):
        raise ValueError(f"text_image_ids must lie in [0, {n_images})")
    positive = ids[None, :] == np.arange(n_images)[:, None]  # (n_images, n_texts)
    if not positive.any(axis=1).all():
        raise ValueError("every image needs at least one caption")
    i2t = _ranks_of_positives(sim, positive)
    t2i = _ranks_of_positives(sim.T, positive.T)
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in KS:
            out[f"{name}_r{k}"] = float(100.0 * (ranks <= k).mean())
        out[f"{name}_medr"] = float(np.floor(np.median(ranks)))  # VSE convention: floor of the median
        out[f"{name}_meanr"] = float(ranks.mean())
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in KS)
    return out


def format_metrics(m: Mapping[str, float]) -> str:
    """One human-readable line of R@K figures."""
    return (
        f"i2t R@1 {m['i2t_r1']:.1f} R@5 {m['i2t_r5']:.1f} R@10 {m['i2t_r10']:.1f} | "
        f"t2i R@1 {m['t2i_r1']:.1f} R@5 {m['t2i_r5']:.1f} R@10 {m['t2i_r10']:.1f} | rsum {m['rsum']:.1f}"
    )
