"""Graded human judgments of image–caption pairs, for Kendall τ between model similarities and human scores."""

from __future__ import annotations

import csv
from pathlib import Path


def read_judgments(path: Path, image_row: dict[str, int], n_texts: int) -> list[tuple[int, int, float]]:
    """Reads a graded-judgment TSV: `image key <TAB> caption index (row in the split's caption list) <TAB> score`.

    Args:
        path: The TSV file (`#` lines are comments).
        image_row: Image key -> row of the similarity matrix.
        n_texts: Number of captions (columns) of the split.

    Returns:
        (image row, caption column, score) triples.

    Raises:
        SystemExit: A line that does not parse, naming the file, the line and the expected format.
    """
    out = []
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) < 3 or row[0] not in image_row or not row[1].isdigit() or int(row[1]) >= n_texts:
                raise SystemExit(f"imgtxt eval: {path}:{n}: expected 'image_key<TAB>caption_index<TAB>score'")
            out.append((image_row[row[0]], int(row[1]), float(row[2])))
    return out
