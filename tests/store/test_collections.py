"""`imgtxt index` creates collections from the bundle's decisions and checks them when reopened; aliases; units."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from indexer.cli import main as index_main
from search.cli import main as search_main
from store.client import ClientStore
from store.factory import open_store
from tests.conftest import make_dataset
from tests.indexer.bundles import bundle_variant


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny towers, as trained for int8 quantisation."""
    return bundle_variant(tiny_bundle, tmp_path_factory.mktemp("b") / "int8", "tiny-int8", quantization="int8")


@pytest.fixture(scope="module")
def headless_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny towers without a trained unit head."""
    return bundle_variant(tiny_bundle, tmp_path_factory.mktemp("b") / "headless", "tiny-headless", unit_head=False)


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data", 4, captions=1)


def _argv(data: Path, bundle: Path, store: Path | str, *extra: str) -> list[str]:
    return [
        str(data),
        "--bundle",
        str(bundle),
        "--in-process",
        "--device",
        "cpu",
        "--store",
        str(store),
        "--no-progress",
        *extra,
    ]


def _edge_config(store: Path, collection: str) -> dict:
    return json.loads((store / collection / "edge_config.json").read_text())


def test_quantization_defaults_to_the_bundle_and_a_flag_overrides_it_loudly(
    data: Path, tmp_path: Path, int8_bundle: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    assert index_main(_argv(data, int8_bundle, tmp_path / "a", "--json", "-")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["collection_config"]["quantization"] == "int8" and report["warnings"] == []
    assert "scalar" in _edge_config(tmp_path / "a", "tiny-int8")["vectors"]["image"]["quantization_config"]

    assert index_main(_argv(data, int8_bundle, tmp_path / "b", "--quantization", "none", "--json", "-")) == 0
    out, log = capsys.readouterr()
    report = json.loads(out)
    warning = "--quantization none overrides bundle tiny-int8's serving.quantization 'int8'"
    assert report["collection_config"]["quantization"] == "none"
    assert any(warning in w for w in report["warnings"])
    assert "WARNING" in log and warning in log  # the log line, on stderr
    assert _edge_config(tmp_path / "b", "tiny-int8")["vectors"]["image"].get("quantization_config") is None


def test_an_existing_collection_with_other_options_is_an_error_until_recreated(
    data: Path, tmp_path: Path, tiny_bundle: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    store = tmp_path / "q"
    assert index_main(_argv(data, tiny_bundle, store)) == 0
    capsys.readouterr()
    for extra in (["--quantization", "int8"], ["--quantization", "int8", "--restart"], ["--hnsw-m", "8"]):
        assert index_main(_argv(data, tiny_bundle, store, *extra)) == 2  # EXIT_USAGE
        err = capsys.readouterr().err
        assert "collection 'tiny-d32-s0' exists with" in err and "--recreate" in err, extra
    assert index_main(_argv(data, tiny_bundle, store, "--quantization", "int8")) == 2
    assert "quantization 'none', not the given 'int8' (--quantization)" in capsys.readouterr().err
    # --recreate deletes the collection (all its points) and its checkpoints, then builds it with the new options.
    small = make_dataset(tmp_path / "small", 2, captions=1)
    assert index_main(_argv(small, tiny_bundle, store, "--quantization", "int8", "--recreate", "--json", "-")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["created"] and report["collection_config"]["quantization"] == "int8" and report["resumed_from"] == 0
    s = open_store(store)
    assert s.count("tiny-d32-s0") == 6  # only the new job's 2 images, 2 captions, 2 units: the old points are gone
    s.close()


def test_collection_flags_reach_the_collection(data: Path, tmp_path: Path, tiny_bundle: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    extra = [
        "--full-scan-threshold-kb",
        "7",
        "--hnsw-m",
        "8",
        "--hnsw-ef-construct",
        "20",
        "--indexing-threshold-kb",
        "3",
        "--max-segment-size-kb",
        "50",
    ]
    assert index_main(_argv(data, tiny_bundle, tmp_path / "q", *extra, "--on-disk")) == 0
    cfg = _edge_config(tmp_path / "q", "tiny-d32-s0")
    assert cfg["hnsw_config"] | {"max_indexing_threads": 0} == {
        "m": 8,
        "ef_construct": 20,
        "full_scan_threshold": 7,
        "max_indexing_threads": 0,
    }
    assert cfg["optimizers"]["indexing_threshold"] == 3 and cfg["vectors"]["text"]["on_disk"] is True
    assert cfg["optimizers"]["max_segment_size"] == 50


def test_server_only_options_are_refused_by_the_embedded_engine_and_passed_to_a_server(
    data: Path, tmp_path: Path, tiny_bundle: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    assert index_main(_argv(data, tiny_bundle, tmp_path / "q", "--shards", "3")) == 2
    err = capsys.readouterr().err
    assert "--shards 3" in err and "one shard with no replicas" in err and "qdrant://" in err
    assert not (tmp_path / "q").exists()
    # qdrant-client's local mode stands in for the server: the options are passed on and recorded.
    server = ["--shards", "3", "--replication-factor", "2", "--write-consistency", "2", "--kinds", "image"]
    assert index_main(_argv(data, tiny_bundle, f"local:{tmp_path / 'local'}", *server)) == 0
    s = ClientStore(f"local:{tmp_path / 'local'}")
    cfg = s.collection_config("tiny-d32-s0")
    s.close()
    assert (cfg.shard_number, cfg.replication_factor, cfg.write_consistency_factor) == (3, 2, 2)


def test_alias_switches_searches_to_a_new_bundle_in_one_step(
    data: Path, tmp_path: Path, tiny_bundle: Path, int8_bundle: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    store = tmp_path / "q"
    assert index_main(_argv(data, tiny_bundle, store, "--alias", "live", "--json", "-")) == 0
    assert json.loads(capsys.readouterr().out)["alias"] == "live"
    query = [
        "--text",
        "photo 2 shows thing 0",
        "--target",
        "text",
        "--top-k",
        "1",
        "--json",
        "-",
        "--collection",
        "live",
    ]
    assert search_main([*query, "--bundle", str(tiny_bundle), "--in-process", "--store", str(store)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["payload"]["bundle_version"] == "tiny-d32-s0"
    # The new bundle is indexed beside the old one, then the alias moves: the old collection stays intact.
    assert index_main(_argv(data, int8_bundle, store, "--alias", "live")) == 0
    capsys.readouterr()
    assert json.loads((store / "imgtxt_aliases.json").read_text()) == {"live": "tiny-int8"}
    assert search_main([*query, "--bundle", str(int8_bundle), "--in-process", "--store", str(store)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["payload"]["bundle_version"] == "tiny-int8"
    # Queries encoded by another bundle than the collection's are refused, not answered from the wrong space.
    assert search_main([*query, "--bundle", str(tiny_bundle), "--in-process", "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert "collection 'tiny-int8' belongs to bundle tiny-int8" in err and "the search uses bundle tiny-d32-s0" in err
    assert (store / "tiny-d32-s0" / "edge_config.json").is_file()


def test_a_second_bundle_is_refused_by_an_existing_collection_naming_both(
    data: Path, tmp_path: Path, tiny_bundle: Path, int8_bundle: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    store = tmp_path / "q"
    assert index_main(_argv(data, tiny_bundle, store)) == 0
    capsys.readouterr()
    # The case: another bundle into the same collection, with its own quantisation and --restart.
    extra = ["--collection", "tiny-d32-s0", "--quantization", "int8", "--restart"]
    assert index_main(_argv(data, int8_bundle, store, *extra)) == 2
    err = capsys.readouterr().err
    assert "collection 'tiny-d32-s0' belongs to bundle tiny-d32-s0" in err and "the write uses bundle tiny-int8" in err
    s = open_store(store)
    versions = {p["bundle_version"] for p, _ in s.dump("tiny-d32-s0").values()}
    s.close()
    assert versions == {"tiny-d32-s0"}  # nothing of the second bundle was written


def test_a_sharded_job_switches_the_alias_when_its_last_shard_is_done(
    dataset: Path, tmp_path: Path, tiny_bundle: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    store = tmp_path / "q"
    base = _argv(dataset, tiny_bundle, store, "--kinds", "image", "--alias", "live", "--num-shards", "2", "--json", "-")
    assert index_main([*base, "--shard-index", "0"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["alias"] is None and "shards [1] are not done" in first["warnings"][0]
    assert not (store / "imgtxt_aliases.json").exists()
    assert index_main([*base, "--shard-index", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["alias"] == "live"


def test_units_need_a_trained_head_or_the_explicit_opt_in(
    data: Path, tmp_path: Path, headless_bundle: Path, tiny_bundle: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    assert index_main(_argv(data, headless_bundle, tmp_path / "q")) == 2  # the default kinds include unit
    err = capsys.readouterr().err
    assert "bundle tiny-headless has no trained unit head" in err and "--untrained-fusion" in err
    assert index_main(_argv(data, headless_bundle, tmp_path / "q", "--kinds", "unit")) == 2
    capsys.readouterr()
    assert index_main(_argv(data, headless_bundle, tmp_path / "q", "--untrained-fusion", "--json", "-")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fusion"] == "normalize(v+t)" and report["indexed"]["unit"] == 4
    s = open_store(tmp_path / "q")
    assert {p["fusion"] for p, _ in s.dump("tiny-headless").values() if p["kind"] == "unit"} == {"normalize(v+t)"}
    s.close()
    # With a trained head, the opt-in overrides it, and says so.
    assert index_main(_argv(data, tiny_bundle, tmp_path / "t", "--untrained-fusion", "--json", "-")) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["fusion"] == "normalize(v+t)" and "not bundle tiny-d32-s0's trained unit head" in report["warnings"][0]
    )


def test_an_untrained_unit_head_needs_the_explicit_opt_in_as_no_head_does(
    data: Path, tmp_path: Path, tiny_bundle: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    """A head no unit loss trained (unit_loss_weight=0) is not indexed as trained."""
    untrained = bundle_variant(tiny_bundle, tmp_path / "u", "tiny-untrained", unit_head_trained=False)
    assert index_main(_argv(data, untrained, tmp_path / "q")) == 2
    err = capsys.readouterr().err
    assert (
        "bundle tiny-untrained has no trained unit head (unit head: untrained)" in err and "--untrained-fusion" in err
    )
    assert index_main(_argv(data, untrained, tmp_path / "q", "--untrained-fusion", "--json", "-")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fusion"] == "normalize(v+t)" and report["warnings"] == []


def test_options_given_for_an_existing_collection_must_match_and_options_not_given_keep_its_own(
    data: Path, tmp_path: Path, tiny_bundle: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    store = tmp_path / "q"
    built = ["--hnsw-m", "8", "--indexing-threshold-kb", "3", "--max-segment-size-kb", "50"]
    assert index_main(_argv(data, tiny_bundle, store, *built)) == 0
    capsys.readouterr()
    # Not given: the collection's own options, whatever the defaults are (no flag is blamed that was not given).
    assert index_main(_argv(data, tiny_bundle, store, "--restart")) == 0
    capsys.readouterr()
    # Given, even those no search depends on, they cannot take effect on it: refused, never silently ignored.
    for flag, value, ours in (("--indexing-threshold-kb", "5", 3), ("--max-segment-size-kb", "60", 50)):
        assert index_main(_argv(data, tiny_bundle, store, flag, value)) == 2
        err = capsys.readouterr().err
        assert f"{ours}, not the given {value} ({flag})" in err and "cannot change on an existing collection" in err
    assert index_main(_argv(data, tiny_bundle, store, "--hnsw-m", "8", "--indexing-threshold-kb", "3")) == 0
    capsys.readouterr()
    server = f"local:{tmp_path / 'local'}"
    assert index_main(_argv(data, tiny_bundle, server, "--shards", "2", "--kinds", "image")) == 0
    capsys.readouterr()
    assert index_main(_argv(data, tiny_bundle, server, "--shards", "3", "--kinds", "image")) == 2
    assert "shard_number 2, not the given 3 (--shards)" in capsys.readouterr().err
    # An embedded-only option is refused for a server (it sizes its own segments).
    assert index_main(_argv(data, tiny_bundle, server, "--max-segment-size-kb", "50", "--kinds", "image")) == 2
    assert "--max-segment-size-kb 50: applies to the embedded engine only" in capsys.readouterr().err


def test_recreate_is_refused_while_aliases_point_at_the_collection(
    data: Path, tmp_path: Path, tiny_bundle: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    store = tmp_path / "q"
    assert index_main(_argv(data, tiny_bundle, store, "--alias", "live")) == 0
    capsys.readouterr()
    assert index_main(_argv(data, tiny_bundle, store, "--recreate")) == 2
    err = capsys.readouterr().err
    assert "--recreate refused: alias(es) live point at collection 'tiny-d32-s0'" in err and "--alias" in err
    s = open_store(store)
    assert s.count("tiny-d32-s0") == 12 and s.aliases_of("tiny-d32-s0") == ["live"]  # nothing was deleted
    s.close()
