"""Graded human judgments of image–caption pairs, read as published, and their rank correlation with model scores.

Formats (`--judgments-format`, detected from the file by default):

- `expert`: Flickr8k-Expert `ExpertAnnotations.txt` — `image.jpg <TAB> caption-image.jpg#k <TAB> s1 <TAB> s2 <TAB> s3`,
  three expert scores from 1 (unrelated) to 4 (describes the image). Each score is one judged pair, as in the
  CLIPScore paper (Hessel et al. 2021), so an (image, caption) pair counts three times.
- `crowdflower`: Flickr8k `CrowdFlowerAnnotations.txt` — `image.jpg <TAB> caption-image.jpg#k <TAB> share of yes
  <TAB> count yes <TAB> count no`; the share of yes is the score.
- `tsv`: this project's own `image key <TAB> caption row (in the split's caption list) <TAB> score`.

A caption id `caption-image.jpg#k` names the k-th caption of another image (candidates are captions of other images
of the same split); judged images and captions outside the evaluated split are skipped and counted.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from imgtxt.datasets import CaptionedImage
from imgtxt.errors import InvalidInput

FORMATS = ("auto", "expert", "crowdflower", "tsv")


@dataclass(frozen=True)
class JudgedPairs:
    """Judged (image row, caption column, human score) triples of one split."""

    rows: np.ndarray
    """(n,) image rows of the similarity matrix."""
    cols: np.ndarray
    """(n,) caption columns."""
    scores: np.ndarray
    """(n,) human scores."""
    skipped: int = 0
    """Judgments naming an image or caption outside the evaluated split."""
    fmt: str = "tsv"
    """The format the file was read as."""
    keys: list[tuple[str, str, int]] = field(default_factory=list)
    """(image key, caption's image key, caption index) of each pair, for evaluation through the index."""

    def __len__(self) -> int:
        return len(self.scores)


def detect_format(path: Path) -> str:
    """`expert`, `crowdflower` or `tsv`, from the first data line's shape.

    Raises:
        InvalidInput: A line fits none of the formats.
    """
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) == 5 and "#" in row[1]:
                # Expert scores are integers 1..4; CrowdFlower's third column is a share in [0, 1].
                return "expert" if all(c.strip().isdigit() for c in row[2:]) else "crowdflower"
            if len(row) == 3 and row[1].isdigit():
                return "tsv"
            raise InvalidInput(f"{path}:{n}: not a judgment line of any known format ({', '.join(FORMATS[1:])})")
    raise InvalidInput(f"{path}: no judgment lines")


def _caption_id(value: str, path: Path, n: int) -> tuple[str, int]:
    key, sep, index = value.rpartition("#")
    if not sep or not key or not index.isdigit():
        raise InvalidInput(f"{path}:{n}: caption id must be IMAGE#k (e.g. 1000268201_693b08cb0e.jpg#2), got {value!r}")
    return key, int(index)


def load_judgments(path: Path, records: Sequence[CaptionedImage], fmt: str = "auto") -> JudgedPairs:
    """Reads a judgment file and maps it onto the split's similarity matrix (images x captions in record order).

    Raises:
        InvalidInput: Unknown format, or a malformed line (naming the file, the line and the expected shape).
    """
    if fmt not in FORMATS:
        raise InvalidInput(f"judgments format must be one of {FORMATS}, got {fmt!r}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    image_row = {r.key: i for i, r in enumerate(records)}
    caption_col: dict[tuple[str, int], int] = {}
    for r in records:
        for k in range(len(r.captions)):
            caption_col[(r.key, k)] = len(caption_col)
    col_owner = {col: key for key, col in caption_col.items()}
    rows: list[int] = []
    cols: list[int] = []
    scores: list[float] = []
    keys: list[tuple[str, str, int]] = []
    skipped = 0
    expected = {
        "expert": "image<TAB>image#k<TAB>s1<TAB>s2<TAB>s3 (scores 1-4)",
        "crowdflower": "image<TAB>image#k<TAB>share_yes<TAB>count_yes<TAB>count_no",
        "tsv": "image_key<TAB>caption_index<TAB>score",
    }[fmt]
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or row[0].startswith("#"):
                continue
            try:
                if fmt == "tsv":
                    if len(row) < 3 or not row[1].isdigit():
                        raise ValueError
                    col = int(row[1])
                    owner = col_owner.get(col)
                    if row[0] not in image_row or owner is None:
                        skipped += 1
                        continue
                    pair_scores = [float(row[2])]
                    cap = owner
                else:
                    if len(row) != 5:
                        raise ValueError
                    cap = _caption_id(row[1], path, n)
                    if fmt == "expert":
                        pair_scores = [float(int(v)) for v in row[2:5]]
                        if not all(1 <= v <= 4 for v in pair_scores):
                            raise ValueError
                    else:
                        pair_scores = [float(row[2])]
                        if not 0.0 <= pair_scores[0] <= 1.0:
                            raise ValueError
                    if row[0] not in image_row or cap not in caption_col:
                        skipped += 1
                        continue
            except InvalidInput:
                raise
            except ValueError:
                raise InvalidInput(f"{path}:{n}: expected '{expected}' ({fmt} format), got {row!r}") from None
            for score in pair_scores:
                rows.append(image_row[row[0]])
                cols.append(caption_col[cap])
                scores.append(score)
                keys.append((row[0], cap[0], cap[1]))
    return JudgedPairs(np.array(rows, np.int64), np.array(cols, np.int64), np.array(scores), skipped, fmt, keys)


def graded_correlation(model_scores: np.ndarray, pairs: JudgedPairs) -> dict[str, float]:
    """Kendall τc (the CLIPScore paper's) and τb over all judged pairs, between model and human scores.

    Args:
        model_scores: (n,) the model's similarity of each judged pair (`sim[pairs.rows, pairs.cols]`).
        pairs: The judged pairs.

    Returns:
        `kendall_tau_c`, `kendall_tau_b` (NaN with fewer than two pairs), `judged_pairs`, `judgments_skipped`.
    """
    out = {"judged_pairs": float(len(pairs)), "judgments_skipped": float(pairs.skipped)}
    if len(pairs) < 2:
        return {**out, "kendall_tau_c": float("nan"), "kendall_tau_b": float("nan")}
    tau_c = stats.kendalltau(model_scores, pairs.scores, variant="c").statistic
    tau_b = stats.kendalltau(model_scores, pairs.scores, variant="b").statistic
    return {**out, "kendall_tau_c": float(tau_c), "kendall_tau_b": float(tau_b)}
