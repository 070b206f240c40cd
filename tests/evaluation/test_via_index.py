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
from store.base import CollectionConfig, SearchOptions
from store.factory import open_store
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


def _in_process(bundle: Path) -> list[str]:
    return ["--bundle", str(bundle), "--in-process", "--device", "cpu"]


def test_eval_reuses_a_collection_an_indexing_job_built(tmp_path: Path, tiny_bundle: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from indexer.cli import main as index_main

    data = make_dataset(tmp_path / "data", 6, captions=2)
    store = tmp_path / "q"
    # The job's default split is val, the one eval measures by default; units in the collection do not count.
    assert index_main([str(data), *_in_process(tiny_bundle), "--store", str(store), "--alias", "live"]) == 0
    capsys.readouterr()
    own = ["--via-index", "--data", str(data), *_in_process(tiny_bundle), "--exact", "--json", "-"]
    assert main(own) == 0
    fresh = json.loads(capsys.readouterr().out)
    assert main([*own, "--store", str(store), "--reuse", "--collection", "live"]) == 0
    reused = json.loads(capsys.readouterr().out)
    assert reused["reused"] and reused["source"] == "index:tiny-d32-s0" and not fresh["reused"]
    for key in ("rsum", "i2t_r1", "t2i_r5", "i2t_medr"):
        assert reused[key] == pytest.approx(fresh[key], abs=1e-9), key
    # It must hold exactly the split's points: here 6 images, not the first 4 the evaluation asks for.
    assert main([*own, "--store", str(store), "--reuse", "--limit", "4"]) == 2  # EXIT_USAGE
    err = capsys.readouterr().err
    assert "does not hold exactly the split's points: it has 6 image and 12 text points, the split 4 images" in err
    # Given collection flags must match the collection as built.
    assert main([*own, "--store", str(store), "--reuse", "--quantization", "int8"]) == 2
    assert "exists with quantization 'none', not the given 'int8' (--quantization)" in capsys.readouterr().err
    # Without --reuse, a named existing collection is not silently deleted.
    assert main([*own, "--store", str(store), "--collection", "tiny-d32-s0"]) == 2
    assert "pass --reuse to evaluate it as it was built, or --recreate" in capsys.readouterr().err
    # And --recreate is refused while an alias points at it (the alias would serve a collection being rebuilt).
    assert main([*own, "--store", str(store), "--collection", "tiny-d32-s0", "--recreate"]) == 2
    assert "--recreate refused: alias(es) live point at collection 'tiny-d32-s0'" in capsys.readouterr().err


def test_via_index_is_selected_by_flag_or_variable(tmp_path: Path, tiny_bundle: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from imgtxt.cli import main as imgtxt_main

    data = make_dataset(tmp_path / "data", 3, captions=1)
    argv = ["--data", str(data), *_in_process(tiny_bundle), "--exact", "--json", "-", "--full-scan-threshold-kb", "1"]
    assert main(["--via-index", *argv]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["source"] == "index:tiny-d32-s0-eval-val"
    assert result["collection_config"]["full_scan_threshold"] == 1  # the flag reaches the collection
    monkeypatch.setenv("IMGTXT_VIA_INDEX", "1")  # advertised by --help: selects the mode as the flag does
    assert imgtxt_main(["eval", *argv]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == "index:tiny-d32-s0-eval-val"
    with pytest.raises(SystemExit):
        main([*argv, "--split", "all"])
    assert "an evaluation measures one split" in capsys.readouterr().err


def test_the_dispatcher_runs_eval_via_index(tmp_path: Path, tiny_bundle: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from imgtxt.cli import main as imgtxt_main

    data = make_dataset(tmp_path / "data", 2, captions=1)
    argv = ["eval", "--via-index", "--data", str(data), *_in_process(tiny_bundle), "--exact", "--json", "-"]
    assert imgtxt_main(argv) == 0
