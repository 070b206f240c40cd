"""R@K through the index equals the offline evaluation (numpy similarity of the same ORT embeddings), exact search."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evaluation.cli import main
from evaluation.via_index import evaluate_via_index
from imgtxt.datasets import load_captioned_images
from imgtxt.encoders.bundle import BundleEncoder
from imgtxt.retrieval_metrics import retrieval_metrics
from indexer.stores.base import CollectionConfig, SearchOptions
from indexer.stores.factory import open_store
from tests.conftest import make_dataset


@pytest.mark.parametrize("location", ["edge", ":memory:"])
def test_exact_search_reproduces_offline_metrics(tmp_path: Path, encoder: BundleEncoder, location: str) -> None:
    data = make_dataset(tmp_path / "data", 16, captions=3)
    items = load_captioned_images(data, split="val")
    images = encoder.encode_images([it.path.read_bytes() for it in items]).embeddings
    texts = encoder.encode_texts([c for it in items for c in it.captions]).embeddings
    ids = [it.image_id for it in items for _ in it.captions]
    offline = retrieval_metrics(images @ texts.T, ids)

    store = open_store(tmp_path / "q" if location == "edge" else location)
    via_index = evaluate_via_index(
        items, encoder, store, "eval", CollectionConfig(dim=encoder.dim), SearchOptions(exact=True)
    )
    # A top-10 search (what a served query asks for) gives the same R@K; ranks past 10 are unknown, so no medr/meanr.
    top10 = evaluate_via_index(
        items,
        encoder,
        store,
        "eval",
        CollectionConfig(dim=encoder.dim),
        SearchOptions(exact=True),
        reindex=False,
        depth=10,
    )
    store.close()
    assert via_index["n_images"] == 16 and via_index["n_texts"] == 48
    for key, value in offline.items():
        assert via_index[key] == pytest.approx(value, abs=1e-9), key
        if key.endswith(("medr", "meanr")):
            assert key not in top10
        else:
            assert top10[key] == pytest.approx(value, abs=1e-9), key
    assert 0 < offline["rsum"] < 600  # not a degenerate ranking


def test_eval_command_prints_json(tmp_path: Path, tiny_bundle: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = make_dataset(tmp_path / "data", 6, captions=2)
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
        "--json",
        "-",
    ]
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) >= {"i2t_r1", "t2i_r10", "rsum", "i2t_medr"} and np.isfinite(metrics["rsum"])
