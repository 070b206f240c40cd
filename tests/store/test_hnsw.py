"""Whether the HNSW graph answers a filtered search: the full-scan threshold decides (issue 14's finding).

Qdrant's planner estimates how many points a filter matches (from the `kind` payload index) in each segment; when
that is below the collection's full-scan threshold (KB of vectors, here 1 KB = 4 vectors of 64 floats), it scores
those points exactly instead of walking the graph. So a low `hnsw_ef` loses recall only once the threshold is below
the filtered set's size: the one thing these tests can observe from outside the engine.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

from store.base import CollectionConfig, PointData, SearchOptions
from store.edge import EdgeStore
from tests.store.identities import identity

DIM = 64
N = 1500  # points per kind
EXACT = SearchOptions(exact=True)


def _store(root: Path, full_scan_threshold: int, images: int = N, texts: int = N, units: int = 0) -> EdgeStore:
    """Random vectors: `image` and `text` points, and `unit` points that carry an image vector too."""
    rng = np.random.default_rng(0)
    store = EdgeStore(root)
    # indexing_threshold=1: build the graph even for a few hundred KB of vectors.
    store.ensure_collection(
        "c",
        CollectionConfig(dim=DIM, full_scan_threshold=full_scan_threshold, indexing_threshold=1),
        identity("h", DIM),
    )
    points = [
        PointData(str(uuid.UUID(int=i)), {kind: v}, {"kind": k})
        for i, (kind, k, v) in enumerate(
            [("image", "image", v) for v in rng.normal(size=(images, DIM))]
            + [("text", "text", v) for v in rng.normal(size=(texts, DIM))]
            + [("image", "unit", v) for v in rng.normal(size=(units, DIM))]
        )
    ]
    for start in range(0, len(points), 500):
        store.upsert("c", points[start : start + 500])
    store.flush("c")
    store.optimize("c")
    return store


def _recall(store: EdgeStore, queries: np.ndarray, ef: int, kind: str | None = "image") -> float:
    """Mean top-10 overlap of an HNSW search (ef) with exact search, filtered on `kind` (None: no filter)."""
    flt = {"kind": kind} if kind else None
    approx = store.search("c", queries, "image", 10, flt, SearchOptions(hnsw_ef=ef), with_payload=False)
    exact = store.search("c", queries, "image", 10, flt, EXACT, with_payload=False)
    return float(np.mean([len({h.id for h in a} & {h.id for h in e}) / 10 for a, e in zip(approx, exact, strict=True)]))


def test_the_graph_answers_only_below_the_full_scan_threshold(tmp_path: Path) -> None:
    queries = np.random.default_rng(1).normal(size=(60, DIM)).astype(np.float32)
    default = _store(tmp_path / "default", CollectionConfig(dim=DIM).full_scan_threshold)
    # The finding: at the default threshold (10000 KB = 40000 such vectors) ef=4 is exact, so it measures nothing.
    assert _recall(default, queries, ef=4) == 1.0
    default.close()
    low = _store(tmp_path / "low", full_scan_threshold=1)
    # Below the threshold the graph answers: a tiny ef misses neighbours, a large one finds them all.
    assert _recall(low, queries, ef=4) < 0.95
    assert _recall(low, queries, ef=N) == 1.0
    low.close()


def test_a_selective_filter_is_scanned_even_where_unfiltered_search_uses_the_graph(tmp_path: Path) -> None:
    # 300 image points among 3000 unit points that also carry an image vector. A threshold of 250 KB (1000 vectors)
    # is below the unfiltered set of a segment but above kind=image's estimate in any segment.
    queries = np.random.default_rng(1).normal(size=(60, DIM)).astype(np.float32)
    store = _store(tmp_path / "q", full_scan_threshold=250, images=300, texts=0, units=3000)
    assert store.shard_info("c").segments_count >= 2
    assert _recall(store, queries, ef=4, kind=None) < 0.95  # unfiltered: the graph
    assert _recall(store, queries, ef=4, kind="image") == 1.0  # filtered: the exact scan
    store.close()
