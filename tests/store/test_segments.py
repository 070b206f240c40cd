"""Segments of the embedded store: sealed while writing once full (`max_segment_size`), released after `optimize()`.

The engine runs its optimisers only when asked, and keeps every page of its memory-mapped storage it wrote or read
resident, so one segment that grows until the final `optimize()` costs memory in proportion to the collection. These
tests observe the layout from outside: segment counts, indexed vectors and the files the process maps.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from store.base import DEFAULT_MAX_SEGMENT_SIZE, CollectionConfig, PointData, SearchOptions
from store.edge import EdgeStore
from store.ids import point_id
from tests.store.identities import identity

DIM = 8
BATCH = 100  # points per upsert: 3200 bytes of vectors
# 4 KB: the store seals after every second batch (6400 bytes), so each sealed segment holds 200 points.
SMALL = CollectionConfig(dim=DIM, indexing_threshold=1, max_segment_size=4)
BUNDLE = identity("segments", DIM)


def _write(store: EdgeStore, batches: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(batches * BATCH, DIM)).astype(np.float32)
    for b in range(batches):
        store.upsert(
            "c",
            [
                PointData(point_id("image", str(i)), {"image": vectors[i]}, {"kind": "image"})
                for i in range(b * BATCH, (b + 1) * BATCH)
            ],
        )
    return vectors


def _mapped_segments(root: Path) -> set[str]:
    """Segment directories under `root` that this process has memory-mapped files of."""
    out = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith(str(root)) and "/segments/" in parts[5]:
            out.add(parts[5].split("/segments/")[1].split("/")[0])
    return out


def test_a_full_segment_is_sealed_and_indexed_while_writing(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path)
    store.ensure_collection("c", SMALL, BUNDLE)
    vectors = _write(store, 9)
    info = store.shard_info("c")
    # Four seals of 200 points, each an indexed segment, before any optimize(); the last 100 wait in a fifth.
    assert (info.segments_count, info.indexed_vectors_count, info.points_count) == (5, 800, 900)
    assert store.optimize_seconds > 0
    store.optimize("c")
    assert store.shard_info("c").indexed_vectors_count == 900
    # Searches see every segment: each stored vector finds itself first.
    hits = store.search("c", vectors[::97], "image", 1, options=SearchOptions(hnsw_ef=64), with_payload=False)
    assert [h[0].id for h in hits] == [point_id("image", str(i)) for i in range(0, 900, 97)]
    store.close()


def test_without_a_segment_size_one_segment_waits_for_optimize(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path)
    store.ensure_collection("c", dataclasses.replace(SMALL, max_segment_size=None), BUNDLE)
    _write(store, 9)
    info = store.shard_info("c")
    assert (info.segments_count, info.indexed_vectors_count, store.optimize_seconds) == (1, 0, 0.0)
    store.close()


def test_optimize_releases_the_segments_it_replaced(tmp_path: Path) -> None:
    # Without the flush in optimize(), the engine keeps the replaced segment mapped (and its pages resident) and its
    # directory on disk: three segments mapped for two live ones.
    store = EdgeStore(tmp_path)
    store.ensure_collection("c", dataclasses.replace(SMALL, max_segment_size=None), BUNDLE)
    _write(store, 9)
    store.optimize("c")
    live = store.shard_info("c").segments_count
    assert live == 2  # the indexed segment and a new, empty appendable one
    assert len(_mapped_segments(tmp_path)) == live == len(list((tmp_path / "c" / "segments").iterdir()))
    store.close()


def test_the_segment_size_is_recorded_and_governs_a_reopened_collection(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path)
    store.ensure_collection("c", SMALL, BUNDLE)
    store.close()
    again = EdgeStore(tmp_path)
    assert again.collection_config("c").max_segment_size == 4
    # Reopened with other options that a search does not depend on, it keeps its own segment size.
    again.ensure_collection("c", dataclasses.replace(SMALL, max_segment_size=None), BUNDLE)
    _write(again, 4)
    assert again.shard_info("c").segments_count == 3
    again.close()
    assert CollectionConfig(dim=DIM).max_segment_size == DEFAULT_MAX_SEGMENT_SIZE


def test_an_indexing_threshold_above_the_segment_size_is_refused() -> None:
    with pytest.raises(ValueError, match="must not exceed max_segment_size"):
        CollectionConfig(dim=DIM, indexing_threshold=10, max_segment_size=4)
    with pytest.raises(ValueError, match="positive number of KB"):
        CollectionConfig(dim=DIM, max_segment_size=0)
