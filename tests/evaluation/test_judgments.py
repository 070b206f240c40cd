"""Graded judgments in the published Flickr8k-Expert and CrowdFlower formats, and Kendall τc / τb over all pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from evaluation.judgments import detect_format, graded_correlation, load_judgments
from imgtxt.datasets import CaptionedImage
from imgtxt.errors import InvalidInput

# Three images of the split with two captions each: caption columns 0,1 (a), 2,3 (b), 4,5 (c).
RECORDS = [
    CaptionedImage(i, f"{k}.jpg", Path(f"/x/{k}.jpg"), (f"{k} one", f"{k} two"), "val")
    for i, k in enumerate(("a", "b", "c"))
]


def _write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_expert_annotations_as_published(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "ExpertAnnotations.txt",
        [
            "a.jpg\ta.jpg#0\t4\t4\t3",
            "a.jpg\tb.jpg#1\t1\t2\t1",  # a caption of another image of the split
            "b.jpg\tc.jpg#0\t2\t2\t2",
            "z.jpg\ta.jpg#0\t4\t4\t4",  # image outside the split: skipped
            "b.jpg\tq.jpg#3\t1\t1\t1",  # caption outside the split: skipped
        ],
    )
    assert detect_format(path) == "expert"
    pairs = load_judgments(path, RECORDS)
    assert pairs.fmt == "expert" and pairs.skipped == 2 and len(pairs) == 9  # three expert scores per pair
    assert pairs.rows.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert pairs.cols.tolist() == [0, 0, 0, 3, 3, 3, 4, 4, 4]
    assert pairs.scores.tolist() == [4, 4, 3, 1, 2, 1, 2, 2, 2]
    assert pairs.keys[3] == ("a.jpg", "b.jpg", 1)


def test_crowdflower_annotations_as_published(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "CrowdFlowerAnnotations.txt",
        [
            "a.jpg\ta.jpg#1\t1.0\t3\t0",
            "c.jpg\tb.jpg#0\t0.333333333333\t1\t2",
        ],
    )
    assert detect_format(path) == "crowdflower"
    pairs = load_judgments(path, RECORDS)
    assert (pairs.rows.tolist(), pairs.cols.tolist()) == ([0, 2], [1, 2])
    assert pairs.scores == pytest.approx([1.0, 1 / 3])


def test_malformed_lines_name_the_file_line_and_format(tmp_path: Path) -> None:
    bad_score = _write(tmp_path, "e.txt", ["a.jpg\ta.jpg#0\t4\t4\t3", "a.jpg\tb.jpg#0\t5\t1\t1"])
    with pytest.raises(InvalidInput, match=r"e\.txt:2: expected .*scores 1-4.*expert"):
        load_judgments(bad_score, RECORDS)
    bad_id = _write(tmp_path, "c.txt", ["a.jpg\ta.jpg-0\t0.5\t1\t1"])
    with pytest.raises(InvalidInput, match=r"c\.txt:1: caption id must be IMAGE#k"):
        load_judgments(bad_id, RECORDS, fmt="crowdflower")
    with pytest.raises(InvalidInput, match="not a judgment line"):
        detect_format(_write(tmp_path, "x.txt", ["just words"]))


def test_tau_c_and_tau_b_over_all_pairs_hand_computed(tmp_path: Path) -> None:
    # Human scores 1, 2, 2, 3 against model scores 0.1, 0.3, 0.2, 0.4 (one tie in the human scores).
    path = _write(tmp_path, "j.tsv", ["a.jpg\t0\t1", "a.jpg\t1\t2", "b.jpg\t2\t2", "c.jpg\t4\t3"])
    pairs = load_judgments(path, RECORDS)
    assert pairs.fmt == "tsv"
    sim = np.zeros((3, 6))
    sim[pairs.rows, pairs.cols] = [0.1, 0.3, 0.2, 0.4]
    out = graded_correlation(sim[pairs.rows, pairs.cols], pairs)
    # 6 pairs: 5 concordant, 0 discordant, 1 tied in y only. tau_b = 5 / sqrt(6 * 5); tau_c = 2m(C-D)/(n^2 (m-1)),
    # m = min(distinct x, distinct y) = 3, n = 4: 2*3*5 / (16*2) = 0.9375.
    assert out["kendall_tau_b"] == pytest.approx(5 / np.sqrt(30))
    assert out["kendall_tau_c"] == pytest.approx(0.9375)
    assert out["judged_pairs"] == 4 and out["judgments_skipped"] == 0
    assert np.isnan(
        graded_correlation(np.array([0.5]), load_judgments(_write(tmp_path, "one.tsv", ["a.jpg\t0\t1"]), RECORDS))[
            "kendall_tau_c"
        ]
    )
