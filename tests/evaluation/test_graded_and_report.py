"""`imgtxt eval` with graded judgments in the published Expert format (bundle and through the index agree), and the
HTML report with contact sheets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from evaluation.cli import main
from evaluation.judgments import graded_correlation, load_judgments
from imgtxt.datasets import load_captioned_images
from imgtxt.encoders.bundle import BundleEncoder
from tests.conftest import make_dataset


def _expert_file(path: Path, data: Path) -> Path:
    """Expert-style judgments over the split: each image against its own first caption and two of other images."""
    items = load_captioned_images(data, split="val")
    rng = np.random.default_rng(0)
    lines = []
    for i, it in enumerate(items):
        others = [items[(i + d) % len(items)] for d in (1, 3)]
        lines.append(f"{it.key}\t{it.key}#0\t4\t4\t3")
        for o in others:
            a, b, c = rng.integers(1, 3, 3)
            lines.append(f"{it.key}\t{o.key}#{int(rng.integers(0, 2))}\t{a}\t{b}\t{c}")
    lines.append(f"not-in-split.jpg\t{items[0].key}#0\t1\t1\t1")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bundle_and_index_give_the_same_kendall_tau(tmp_path: Path, tiny_bundle: Path, encoder: BundleEncoder) -> None:
    data = make_dataset(tmp_path / "data", 10, captions=2)
    judgments = _expert_file(tmp_path / "ExpertAnnotations.txt", data)
    offline, via = tmp_path / "offline.json", tmp_path / "via.json"
    common = ["--data", str(data), "--bundle", str(tiny_bundle), "--device", "cpu", "--judgments", str(judgments)]
    assert main([*common, "--json", str(offline)]) == 0
    assert main([*common, "--via-index", "--in-process", "--exact", "--json", str(via)]) == 0
    a, b = json.loads(offline.read_text()), json.loads(via.read_text())
    assert a["judged_pairs"] == b["judged_pairs"] == 10 * 3 * 3 and a["judgments_skipped"] == 1
    assert a["kendall_tau_c"] == pytest.approx(b["kendall_tau_c"], abs=1e-9)
    assert a["kendall_tau_b"] == pytest.approx(b["kendall_tau_b"], abs=1e-9)
    # The figure is Kendall's tau-c of the bundle's cosine against the expert scores, over every judgment.
    items = load_captioned_images(data, split="val")
    pairs = load_judgments(judgments, items)
    img = encoder.encode_images([it.path.read_bytes() for it in items]).embeddings
    txt = encoder.encode_texts([c for it in items for c in it.captions]).embeddings
    expected = graded_correlation((img @ txt.T)[pairs.rows, pairs.cols], pairs)
    assert a["kendall_tau_c"] == pytest.approx(expected["kendall_tau_c"])


def test_report_shows_metrics_and_contact_sheets(tmp_path: Path, tiny_bundle: Path) -> None:
    data = make_dataset(tmp_path / "data", 8, captions=2)
    out = tmp_path / "report"
    assert main(["--data", str(data), "--bundle", str(tiny_bundle), "--device", "cpu", "--report", str(out)]) == 0
    page = (out / "report.html").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"{metrics['rsum']:.1f}" in page
    assert page.count("<h2>") == 2  # text -> image and image -> text
    thumbnails = re.findall(r"src='data:image/jpeg;base64,", page)
    assert len(thumbnails) >= 6 * 5  # six caption queries with their top-5 images (plus the image queries)
    assert page.count("class='right'") >= 1 and "rank" in page
    # Through the index: the same example queries, ranked by the store (exact search: the same ranking).
    via = tmp_path / "via-report"
    argv = [
        "--via-index",
        "--data",
        str(data),
        "--bundle",
        str(tiny_bundle),
        "--in-process",
        "--device",
        "cpu",
        "--exact",
        "--report",
        str(via),
    ]
    assert main(argv) == 0
    via_page = (via / "report.html").read_text()
    ranks = re.findall(r"rank (\d+)", page)
    assert ranks and re.findall(r"rank (\d+)", via_page) == ranks
