"""Graded retrieval measures against a relevance label source: mAP@R, R-Precision and per-query Kendall τb.

mAP@R and R-Precision are the measures of ECCV Caption (Chun et al. 2022, "ECCV Caption: Correcting False Negatives
by Collecting Machine-and-Human-verified Image-Caption Associations for MS-COCO", after Musgrave et al. 2020): a
query with R relevant items is scored on its top R results only, so every relevant item counts, not just the first
one R@K finds. Per-query Kendall τb compares the model's whole ranking of one query's candidates with graded labels
of them (ties in either kept by the b variant). The labels must come from a source the scored model did not train on.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import stats

logger = logging.getLogger(__name__)


def _top_r(scores: np.ndarray, relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query: R (its relevant count) and the relevance of its ranked results (stable order on ties)."""
    if scores.shape != relevant.shape:
        raise ValueError(f"scores {scores.shape} and relevant {relevant.shape} must have one shape")
    r = relevant.sum(axis=1)
    if (r == 0).any():
        raise ValueError(f"{int((r == 0).sum())} queries have no relevant item: mAP@R is undefined for them")
    order = np.argsort(-scores, axis=1, kind="stable")
    return r, np.take_along_axis(relevant, order, axis=1)


def map_at_r(scores: np.ndarray, relevant: np.ndarray) -> float:
    """Mean over queries of AP@R = (1/R) Σ_{k ≤ R} P@k · rel_k (R: the query's relevant count).

    Args:
        scores: (Q, N) model scores of every query against every candidate.
        relevant: (Q, N) bool relevance.
    """
    r, ranked = _top_r(scores, relevant)
    n = scores.shape[1]
    hits = ranked.astype(np.float64)
    precision = np.cumsum(hits, axis=1) / np.arange(1, n + 1)
    within = np.arange(n)[None, :] < r[:, None]
    return float(((precision * hits * within).sum(axis=1) / r).mean())


def r_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """Mean over queries of the precision of the top R results (R: the query's relevant count)."""
    r, ranked = _top_r(scores, relevant)
    within = np.arange(scores.shape[1])[None, :] < r[:, None]
    return float(((ranked & within).sum(axis=1) / r).mean())


def mean_kendall_tau_b(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over queries of Kendall τb between the model's scores and the graded labels of the query's candidates
    (queries whose labels are all equal have no τ and are left out; NaN when no query has one)."""
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must have one shape")
    taus = [stats.kendalltau(s, g, variant="b").statistic for s, g in zip(scores, labels, strict=True) if np.ptp(g) > 0]
    return float(np.mean(taus)) if taus else float("nan")


def graded_metrics(sim: np.ndarray, labels: np.ndarray, relevant: np.ndarray) -> dict[str, float]:
    """mAP@R, R-Precision and mean per-query Kendall τb in both directions.

    Args:
        sim: (n_images, n_captions) model similarities.
        labels: (n_images, n_captions) graded relevance labels.
        relevant: (n_images, n_captions) bool relevance (e.g. own captions or labels above a threshold).

    Returns:
        `i2t_map_r`, `i2t_r_precision`, `i2t_tau_b`, then the `t2i_` three on the transposes, all in percent
        (τb times 100), as R@K is.
    """
    out = {}
    for direction, s, g, rel in (("i2t", sim, labels, relevant), ("t2i", sim.T, labels.T, relevant.T)):
        out[f"{direction}_map_r"] = 100 * map_at_r(s, rel)
        out[f"{direction}_r_precision"] = 100 * r_precision(s, rel)
        out[f"{direction}_tau_b"] = 100 * mean_kendall_tau_b(s, g)
    return out


def unit_recall(
    queries: np.ndarray,
    units: np.ndarray,
    spare_units: np.ndarray,
    query_image: np.ndarray,
    query_in_unit: np.ndarray,
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K of caption queries against one retrieval unit per image, the query never part of its own unit.

    The gallery holds `units[i]` for every image i (built from one of its captions); a query whose own caption is
    the one inside its image's unit (`query_in_unit`) is scored against `spare_units[i]` instead (the same image
    fused with another of its captions), so no query finds itself (leave one caption out).

    Args:
        queries: (Q, D) query embeddings.
        units: (N, D) the gallery's unit of each image.
        spare_units: (N, D) each image's unit built from a different caption.
        query_image: (Q,) image index of each query.
        query_in_unit: (Q,) bool, the query's caption is the one in `units[query_image]`.
        ks: The cut-offs K.

    Returns:
        `r{K}` for each K and `rsum`, in percent.
    """
    scores = queries @ units.T
    rows = np.arange(len(queries))
    own_unit = np.where(query_in_unit[:, None], spare_units[query_image], units[query_image])
    own = (queries * own_unit).sum(axis=1)
    scores[rows, query_image] = own
    rank = (scores > own[:, None]).sum(axis=1)
    out = {f"r{k}": 100.0 * float((rank < k).mean()) for k in ks}
    out["rsum"] = sum(out[f"r{k}"] for k in ks)
    return out
