"""`imgtxt demo` end to end on the tiny bundle: real service subprocesses, embedded Qdrant, queries, R@K."""

from __future__ import annotations

from pathlib import Path

from demo.cli import main
from tests.conftest import make_dataset


def test_demo_end_to_end_with_tiny_bundle(tmp_path: Path, tiny_bundle: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = make_dataset(tmp_path / "data", 10, captions=2)
    argv = ["--bundle", str(tiny_bundle), "--data", str(data), "--limit", "6", "--artifacts", str(tmp_path / "art")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "SERVING" in out and "indexed image 6, text 12, unit 12" in out
    assert "text -> image queries" in out and "image -> text query" in out and "rsum" in out
    assert (tmp_path / "art" / "qdrant" / "tiny-d32-s0" / "edge_config.json").is_file()
    # A second run reuses the index (the checkpoint says the same job is done).
    assert main(argv) == 0
    assert "already indexed" in capsys.readouterr().out


def test_demo_without_data_explains_how_to_get_it(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["--data", str(tmp_path / "nowhere"), "--artifacts", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err
    assert "no data set found" in err and "--data" in err and "--bundle" in err
