"""The search benchmark's chunked ground truth, its ef recommendation, and one tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks import search_latency as sl
from store.ids import point_id


def test_the_chunked_exact_top_k_equals_a_full_scan_across_chunk_boundaries() -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(16, sl.DIM)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    queries = sl.clustered(7, rng, centers)
    n = 2 * sl.CHUNK + 345  # three chunks, the last one short
    everything = np.concatenate([v for _, v in sl.chunks(n, centers, seed=1)])
    full = np.argsort(-(queries @ everything.T), axis=1)[:, : sl.K]
    expected = [{point_id("image", str(i)) for i in row} for row in full]
    assert [set(row) for row in sl.exact_top_k(n, centers, queries)] == expected


def _row(ef: int, recall: float, quantization: str = "none", backend: str = "embedded") -> sl.Row:
    return {
        "backend": backend,
        "n": 100,
        "quantization": quantization,
        "oversampling": 1.0,
        "hnsw_ef": ef,
        "recall_at_10": recall,
        **dict.fromkeys(("p50_ms", "p99_ms", "build_s", "ingest_s", "index_s", "segments"), 1),
        **dict.fromkeys(("peak_rss_gb", "peak_anon_gb", "peak_file_gb"), 1.0),
    }


def test_the_recommended_ef_is_the_smallest_that_reaches_the_target() -> None:
    rows = [_row(64, 0.995), _row(16, 0.95), _row(32, 0.991), _row(16, 0.5, "int8"), _row(16, 1.0, backend="local")]
    lines = sl.recommend(rows, 0.99)
    assert len(lines) == 2  # local mode is brute force: nothing to recommend
    assert lines[0] == "no ef reaches recall 0.99 for n=100 int8 oversampling 1: best 0.5 at ef 16"
    assert lines[1].startswith("recommended ef for n=100 none: 32 (recall@10 0.991 >= 0.99")


def test_a_tiny_run_reports_recall_build_time_and_memory_per_collection(tmp_path: Path) -> None:
    argv = ["--sizes", "3000", "--quantizations", "none", "--client-sizes", "--queries", "20"]
    argv += ["--hnsw-ef", "8", "64", "--exact-queries", "5", "--max-segment-size-kb", "4000"]
    argv += ["--results", str(tmp_path)]
    assert sl.main(argv) == 0
    rows = json.loads((tmp_path / "search_latency.json").read_text())["rows"]
    assert [r["hnsw_ef"] for r in rows] == [8, 64]
    r = rows[1]
    # 4000 KB holds 2000 vectors of 2 KB: one sealed segment, one written by the final optimize(), one empty.
    assert r["segments"] == 3 and r["exact_agreement"] == 1.0 and r["recall_at_10"] >= 0.99
    assert abs(r["build_s"] - (r["ingest_s"] + r["index_s"])) <= 0.011 and r["index_s"] > 0  # each rounded to .01
    # The anonymous / file parts are sampled by a watcher process (every 0.1 s, after it has started): on a loaded
    # machine a phase this short may end before its first sample, so only their bound is certain.
    assert r["peak_rss_gb"] > 0 and r["peak_anon_gb"] <= r["peak_rss_gb"] and r["peak_file_gb"] <= r["peak_rss_gb"]
    assert r["peak_rss_gb"] == max(r["build_peak_rss_gb"], r["search_peak_rss_gb"])
    assert "recommended ef for n=3000 none: " in (tmp_path / "search_latency.md").read_text()
