"""Search benchmark: p50/p99 latency and recall@10 (vs exact search) at several collection sizes and quantisations.

Synthetic clustered 512-d unit vectors (like real embeddings, they are not uniform on the sphere). Runs the embedded
engine (HNSW) and, at small sizes, qdrant-client's local mode (brute-force Python) for comparison.

    .venv/bin/python -m benchmarks.search_latency --sizes 10000 100000 --queries 200
    .venv/bin/python -m benchmarks.search_latency --sizes 1000000 --quantizations none int8 --on-disk --max-rss-gb 8

Memory stays bounded at any size: vectors are generated and written in chunks (never all in memory), `--on-disk`
keeps the original vectors memory-mapped, and the peak RSS of the process is reported with the figures. A watcher
process kills the run if its RSS passes `--max-rss-gb`, rather than letting the machine swap.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from benchmarks.report import Report, add_results_flag
from indexer.ids import point_id
from indexer.stores.base import CollectionConfig, PointData, SearchOptions, VectorStore
from indexer.stores.factory import open_store

DIM = 512
K = 10


def clustered(n: int, rng: np.random.Generator, centers: np.ndarray) -> np.ndarray:
    """Unit vectors scattered around unit cluster centres (noise of norm ~1: same-cluster cosines ~0.5, like real
    embeddings, where neighbours are close but far from identical)."""
    x = centers[rng.integers(0, len(centers), n)] + rng.normal(size=(n, DIM)).astype(np.float32) / np.sqrt(DIM)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def chunks(n: int, centers: np.ndarray, seed: int, size: int = 10_000) -> Iterator[tuple[int, np.ndarray]]:
    """(start, vectors) chunks of the collection, each generated from its own seed: the same vectors every run, and
    never more than one chunk in memory."""
    for start in range(0, n, size):
        yield start, clustered(min(size, n - start), np.random.default_rng([seed, start]), centers)


def fill(store: VectorStore, n: int, centers: np.ndarray, config: CollectionConfig, batch: int = 2000) -> float:
    """Writes n generated vectors as image points and builds the index; returns seconds."""
    t0 = time.perf_counter()
    store.ensure_collection("bench", config)
    for start, vectors in chunks(n, centers, seed=1):
        for s in range(0, len(vectors), batch):
            store.upsert(
                [
                    PointData(point_id("image", str(start + i)), {"image": vectors[i]}, {"kind": "image"})
                    for i in range(s, min(s + batch, len(vectors)))
                ]
            )
    store.flush()
    store.optimize()
    return time.perf_counter() - t0


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


_WATCHER = """
import os, signal, sys, time
pid, limit = int(sys.argv[1]), float(sys.argv[2])
page = os.sysconf("SC_PAGE_SIZE")
while True:
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * page / 1024**3
    except OSError:  # the benchmark ended
        sys.exit(0)
    if rss > limit:
        print(f"search_latency: RSS {rss:.1f} GB passed --max-rss-gb {limit}: stopping it", flush=True)
        os.kill(pid, signal.SIGKILL)
        sys.exit(3)
    time.sleep(0.5)  # a watchdog's poll interval, not synchronisation
"""


def guard_rss(limit_gb: float) -> subprocess.Popen[bytes]:
    """Kills this process if its RSS passes `limit_gb`: a benchmark that would swap the machine is a result.

    The watcher is a separate process: the engine's native calls hold the GIL for seconds, so a thread could not act.
    """
    return subprocess.Popen([sys.executable, "-c", _WATCHER, str(os.getpid()), str(limit_gb)])


def measure(store: VectorStore, queries: np.ndarray, options: SearchOptions) -> tuple[list[list[str]], np.ndarray]:
    """One query at a time (the interactive case): ids of the top K and per-query latency in ms."""
    ids, lat = [], []
    for q in queries:
        t0 = time.perf_counter()
        (hits,) = store.search(q[None], "image", K, None, options, with_payload=False)
        lat.append((time.perf_counter() - t0) * 1000)
        ids.append([h.id for h in hits])
    return ids, np.array(lat)


def recall(found: list[list[str]], truth: list[list[str]]) -> float:
    """Mean fraction of the exact top K found."""
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def run(
    backend: str,
    n: int,
    quantization: str,
    n_queries: int,
    hnsw_ef: int,
    oversampling: list[float],
    tmp: Path,
    on_disk: bool = False,
) -> list[dict[str, float | str | int]]:
    """Builds one collection and measures it once per oversampling factor (quantised collections only)."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(max(16, n // 500), DIM)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    queries = clustered(n_queries, rng, centers)
    store = open_store(tmp / f"{n}-{quantization}" if backend == "embedded" else ":memory:")
    # Index everything with HNSW (a low indexing threshold), as a collection of this size would be in production.
    config = CollectionConfig(dim=DIM, quantization=quantization, indexing_threshold=1, on_disk=on_disk)
    build_s = fill(store, n, centers, config)
    truth, exact_lat = measure(store, queries, SearchOptions(exact=True))
    rows: list[dict[str, float | str | int]] = []
    for factor in oversampling if quantization != "none" else [1.0]:
        found, lat = measure(store, queries, SearchOptions(hnsw_ef=hnsw_ef, oversampling=factor))
        rows.append(
            {
                "backend": backend,
                "n": n,
                "quantization": quantization,
                "oversampling": factor,
                "build_s": round(build_s, 1),
                "p50_ms": round(float(np.percentile(lat, 50)), 3),
                "p99_ms": round(float(np.percentile(lat, 99)), 3),
                "exact_p50_ms": round(float(np.percentile(exact_lat, 50)), 3),
                "recall_at_10": round(recall(found, truth), 4),
                "on_disk": on_disk,
                "peak_rss_gb": round(peak_rss_gb(), 2),
            }
        )
    store.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--quantizations", nargs="+", default=["none", "int8", "binary"])
    p.add_argument("--client-sizes", type=int, nargs="*", default=[10_000], help="sizes for qdrant-client local mode")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--hnsw-ef", type=int, default=128)
    p.add_argument("--oversampling", type=float, nargs="+", default=[1.0, 4.0], help="quantised: candidates x limit")
    p.add_argument("--on-disk", action="store_true", help="original vectors memory-mapped from disk (large sizes)")
    p.add_argument("--max-rss-gb", type=float, default=None, help="kill the run if its RSS passes this")
    p.add_argument("--tag", default="", help="results file search_latency_<tag>.md (keeps the default run's file)")
    add_results_flag(p)
    args = p.parse_args(argv)
    if args.max_rss_gb:
        guard_rss(args.max_rss_gb)
    name = f"search_latency_{args.tag}" if args.tag else "search_latency"
    report = Report(name, argv, args.results, module="search_latency")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            for q in args.quantizations:
                for row in run(
                    "embedded", n, q, args.queries, args.hnsw_ef, args.oversampling, Path(tmp), args.on_disk
                ):
                    rows.append(row)
                    report.line(json.dumps(row))
        for n in args.client_sizes:
            for row in run("client-local", n, "none", min(args.queries, 50), args.hnsw_ef, [1.0], Path(tmp)):
                rows.append(row)
                report.line(json.dumps(row))
    cols = (
        "backend",
        "n",
        "quantization",
        "oversampling",
        "build_s",
        "p50_ms",
        "p99_ms",
        "exact_p50_ms",
        "recall_at_10",
        "peak_rss_gb",
    )
    report.line()
    report.line(" ".join(f"{c:>13}" for c in cols))
    for r in rows:
        report.line(" ".join(f"{r[c]!s:>13}" for c in cols))
    emb = {(r["n"], r["quantization"]): r for r in rows if r["backend"] == "embedded" and r["oversampling"] == 1.0}
    for r in rows:
        if r["backend"] == "client-local" and (r["n"], "none") in emb:
            ratio = float(r["p50_ms"]) / float(emb[(r["n"], "none")]["p50_ms"])
            report.line(f"client local mode / embedded HNSW p50 latency at {r['n']}: {ratio:.1f}x")
    report.save(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
