"""mAP@R, R-Precision and per-query Kendall τb on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation.graded import graded_metrics, map_at_r, mean_kendall_tau_b, r_precision


def test_map_at_r_and_r_precision_hand_computed() -> None:
    # Query 0: relevant {0, 2} (R = 2); ranking 0, 1, 2, 3 -> top 2 = [rel, not]: AP@R = (1/2)(1/1) = .5, RP = .5.
    # Query 1: relevant {3} (R = 1); ranking 3 first: AP@R = 1, RP = 1.
    # Query 2: relevant {1, 2, 3} (R = 3); ranking 0, 1, 2, 3 -> [not, rel, rel]: AP@R = (1/3)(1/2 + 2/3) = 7/18,
    # RP = 2/3.
    scores = np.array([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.9], [0.9, 0.8, 0.7, 0.6]])
    relevant = np.array([[1, 0, 1, 0], [0, 0, 0, 1], [0, 1, 1, 1]], dtype=bool)
    assert map_at_r(scores, relevant) == pytest.approx((0.5 + 1 + 7 / 18) / 3)
    assert r_precision(scores, relevant) == pytest.approx((0.5 + 1 + 2 / 3) / 3)
    # A relevant item beyond the top R does not count (R@K would credit it at K = 4).
    assert map_at_r(scores[:1], np.array([[0, 0, 0, 1]], dtype=bool)) == 0.0
    with pytest.raises(ValueError, match="no relevant item"):
        map_at_r(scores, np.zeros_like(relevant))


def test_per_query_kendall_tau_b_hand_computed() -> None:
    # Query 0: scores and labels in one order: τ = 1. Query 1: reversed: τ = -1. Query 2: labels (1, 1, 0) with a
    # tie: concordant pairs (0, 2), (1, 2); the tied pair counts in neither; τb = 2 / sqrt(3 * 2) = .8165.
    # Query 3: all labels equal: no τ, left out of the mean.
    scores = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    labels = np.array([[0.9, 0.5, 0.1], [0.1, 0.5, 0.9], [1.0, 1.0, 0.0], [0.3, 0.3, 0.3]])
    expected = (1 - 1 + 2 / math.sqrt(6)) / 3
    assert mean_kendall_tau_b(scores, labels) == pytest.approx(expected)
    assert math.isnan(mean_kendall_tau_b(scores[3:], labels[3:]))


def test_graded_metrics_score_both_directions_in_percent() -> None:
    sim = np.array([[0.9, 0.2, 0.1], [0.3, 0.8, 0.7]])
    labels = np.array([[1.0, 0.2, 0.0], [0.1, 1.0, 0.6]])
    relevant = labels >= 0.6
    out = graded_metrics(sim, labels, relevant)
    assert out["i2t_map_r"] == pytest.approx(100.0) and out["t2i_map_r"] == pytest.approx(100.0)
    assert out["i2t_tau_b"] == pytest.approx(100.0)
    # t2i: caption 0 ranks image 0 above 1 (labels agree), caption 1 likewise, caption 2: image 1 above 0 (agree).
    assert out["t2i_tau_b"] == pytest.approx(100.0)
    worse = graded_metrics(-sim, labels, relevant)
    assert worse["i2t_map_r"] < 100 and worse["i2t_tau_b"] == pytest.approx(-100.0)


def test_unit_recall_leaves_the_query_caption_out_of_its_own_unit() -> None:
    from evaluation.graded import unit_recall

    # Two images. Query 0 (image 0's caption inside units[0]) would match units[0] perfectly; it must be scored
    # against spare_units[0] = (0, 1) instead, where image 1's unit (.8, .6) beats it: rank 1, a miss at R@1.
    # Query 1 (image 0, not in units[0]) meets units[0] = (1, 0): .6 vs image 1's .8: also second.
    # Query 2 (image 1, in units[1]) meets spare_units[1] = (.6, .8): 1.0 vs units[0] .0: first.
    queries = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    units = np.array([[1.0, 0.0], [0.8, 0.6]])
    spare = np.array([[0.0, 1.0], [0.6, 0.8]])
    out = unit_recall(queries, units, spare, np.array([0, 0, 1]), np.array([True, False, True]), ks=(1, 2))
    assert out == pytest.approx({"r1": 100 / 3, "r2": 100.0, "rsum": 100 / 3 + 100})
    # Without leaving the caption out, query 0 would find itself first.
    self_found = unit_recall(queries, units, units, np.array([0, 0, 1]), np.array([True, False, True]), ks=(1,))
    assert self_found["r1"] == pytest.approx(200 / 3)
