"""`imgtxt.retrieval_metrics`: R@K from image ids on hand-made similarity matrices."""

from __future__ import annotations

import numpy as np
import pytest

from imgtxt.retrieval_metrics import retrieval_metrics


def test_perfect_retrieval_with_shuffled_caption_order() -> None:
    ids = np.array([2, 0, 1, 0, 2, 1])  # captions are NOT grouped by image
    sim = (ids[None, :] == np.arange(3)[:, None]).astype(float)
    m = retrieval_metrics(sim, ids)
    assert m["i2t_r1"] == m["t2i_r1"] == 100.0
    assert m["rsum"] == 600.0
    assert m["i2t_medr"] == m["t2i_medr"] == 1.0


def test_hand_computed_ranks() -> None:
    # 2 images, 4 captions: image 0 owns captions 0 and 3, image 1 owns 1 and 2.
    ids = np.array([0, 1, 1, 0])
    sim = np.array(
        [
            [0.1, 0.9, 0.8, 0.7],  # image 0: best own caption (col 3, 0.7) ranks 3rd
            [0.2, 0.3, 0.95, 0.1],  # image 1: col 2 ranks 1st
        ]
    )
    m = retrieval_metrics(sim, ids)
    assert m["i2t_r1"] == 50.0 and m["i2t_r5"] == 100.0
    assert m["i2t_meanr"] == 2.0
    # t2i per caption: col0 rank 2 (image 1 scores 0.2 > 0.1); col1 rank 2 (0.9 > 0.3); col2 and col3 rank 1
    assert m["t2i_r1"] == 50.0
    assert m["t2i_meanr"] == 1.5
    assert m["rsum"] == pytest.approx(50 + 100 + 100 + 50 + 100 + 100)


def test_ties_count_against_the_model() -> None:
    sim = np.zeros((2, 2))
    m = retrieval_metrics(sim, [0, 1])
    assert m["i2t_r1"] == 0.0 and m["t2i_r1"] == 0.0


def test_rejects_bad_ids() -> None:
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_metrics(np.zeros((3, 2)), [0, 1])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        retrieval_metrics(np.zeros((2, 2)), [0, 5])
    with pytest.raises(ValueError):
        retrieval_metrics(np.zeros((2, 3)), [0, 1])
