"""The embedded engine lets one process open a collection: a second gets a clear error, not a `WouldBlock` trace."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from imgtxt.bundle import load_bundle
from search.cli import main as search_main
from store.base import CollectionConfig, PointData
from store.edge import EdgeStore, StoreLocked
from store.ids import point_id
from tests.store.identities import identity

ROOT = Path(__file__).resolve().parents[2]
HOLD = """
import sys
from pathlib import Path
from store.edge import EdgeStore
store = EdgeStore(Path(sys.argv[1]))
store.count("c")
print("holding", flush=True)
sys.stdin.read()
"""


@pytest.fixture()
def held(tmp_path: Path, tiny_bundle: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A collection `c` of the tiny bundle under tmp_path/q, held open by another process until the test ends."""
    store = EdgeStore(tmp_path / "q")
    bundle = load_bundle(tiny_bundle)
    store.ensure_collection("c", CollectionConfig(dim=bundle.manifest.embedding_dim), bundle.identity)
    vector = np.ones(bundle.manifest.embedding_dim, np.float32)
    store.upsert("c", [PointData(point_id("image", "a"), {"image": vector}, {"kind": "image"})])
    store.close()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "q")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
    try:
        yield tmp_path / "q", proc
    finally:
        proc.communicate("")


def test_a_collection_held_by_another_process_is_named_with_its_holder(
    held: tuple[Path, subprocess.Popen[str]], tiny_bundle: Path
) -> None:
    root, proc = held
    store = EdgeStore(root)
    with pytest.raises(StoreLocked) as err:
        store.count("c")
    message = str(err.value)
    assert f"collection {root / 'c'} is in use by pid {proc.pid}" in message  # the path, and what holds it
    assert "WouldBlock" not in message and "qdrant://" in message
    # The collection's options and identity are still readable: only the engine's files are locked.
    assert store.collection_identity("c") == load_bundle(tiny_bundle).identity
    store.close()


def test_a_command_on_a_held_store_exits_with_the_message(
    held: tuple[Path, subprocess.Popen[str]], tiny_bundle: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    root, proc = held
    argv = ["--text", "a dog", "--bundle", str(tiny_bundle), "--in-process", "--store", str(root), "--collection", "c"]
    assert search_main(argv) == 1
    err = capsys.readouterr().err
    assert f"is in use by pid {proc.pid}" in err and "Traceback" not in err


def test_release_lets_another_opener_have_the_collection(tmp_path: Path) -> None:
    """What `imgtxt index --alias` does before it switches the alias: a reader following it can open the collection."""
    writer, reader = EdgeStore(tmp_path / "q"), EdgeStore(tmp_path / "q")
    bundle = identity("b1", 4)
    writer.ensure_collection("c", CollectionConfig(dim=4), bundle)
    writer.upsert("c", [PointData(point_id("image", "a"), {"image": np.ones(4, np.float32)}, {"kind": "image"})])
    with pytest.raises(StoreLocked):  # the engine's lock holds within one process too (one per opener)
        reader.count("c")
    writer.release("c")
    assert reader.count("c") == 1  # the released writes are durable
    writer.close()
    reader.close()
