"""Search benchmark: p50/p99 latency and recall@10 (vs exact search) by collection size, quantisation and HNSW ef.

Synthetic clustered 512-d unit vectors (like real embeddings, they are not uniform on the sphere). Runs the embedded
engine (HNSW) and, at small sizes, qdrant-client's local mode (brute-force Python) for comparison.

    .venv/bin/python -m benchmarks.search_latency --sizes 10000 100000 --queries 200
    .venv/bin/python -m benchmarks.search_latency --sizes 1000000 --quantizations none int8 --client-sizes \\
        --on-disk --max-rss-gb 8 --tag 1m

Memory stays bounded at any size. The vectors are generated and written in chunks, the store seals a segment every
`--max-segment-size-kb` (the collection default), `--on-disk` keeps the original vectors memory-mapped, and the
ground truth is an exact top 10 computed chunk by chunk in numpy. Each collection reports its peak RSS, split into
anonymous memory and resident pages of mapped files (the engine's storage is memory-mapped: those pages count in RSS
but are page cache the kernel can reclaim). A watcher process samples it, and kills the run if its RSS passes
`--max-rss-gb`, rather than letting the machine swap.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import Report, add_results_flag
from imgtxt.bundle import BundleIdentity
from store.base import DEFAULT_MAX_SEGMENT_SIZE, CollectionConfig, PointData, SearchOptions, VectorStore
from store.edge import EdgeStore
from store.factory import open_store
from store.ids import point_id

DIM = 512
K = 10
# The generated vectors' "bundle": the collection records it as every collection records the bundle that wrote it.
BENCH_IDENTITY = BundleIdentity("bench-synthetic", "", DIM)
CHUNK = 10_000
GB = 1024**3
Row = dict[str, Any]

# Samples the benchmark's memory: one line "time rss anon file" (bytes) per poll, appended to a file the benchmark
# reads back per phase; kills the benchmark when its RSS passes the limit (0 = no limit).
_WATCHER = """
import os, signal, sys, time
pid, limit, out = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
with open(out, "a", buffering=1) as log:
    while True:
        try:
            with open(f"/proc/{pid}/status") as f:
                kb = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f) if k.startswith("Rss")}
        except (OSError, ValueError, IndexError):  # the benchmark ended
            sys.exit(0)
        rss = (kb.get("RssAnon", 0) + kb.get("RssFile", 0) + kb.get("RssShmem", 0)) * 1024
        log.write(f"{time.time()} {rss} {kb.get('RssAnon', 0) * 1024} {kb.get('RssFile', 0) * 1024}\\n")
        if limit and rss > limit * 1024**3:
            print(f"search_latency: RSS {rss / 1024**3:.1f} GB passed --max-rss-gb {limit}: stopping it", flush=True)
            os.kill(pid, signal.SIGKILL)
            sys.exit(3)
        time.sleep(0.1)  # a watchdog's poll interval, not synchronisation
"""


@dataclass
class Peak:
    """Peak memory of one phase, in GB: RSS as the kernel's high-water mark has it (exact), and its anonymous and
    file-backed parts at their sampled maxima (the watcher polls every 0.1 s, so a shorter spike can be missed)."""

    rss: float = 0.0
    anon: float = 0.0
    file: float = 0.0

    def max(self, other: Peak) -> Peak:
        """The larger of two peaks, part by part."""
        return Peak(max(self.rss, other.rss), max(self.anon, other.anon), max(self.file, other.file))


@dataclass
class MemoryWatch:
    """The watcher process and the per-phase peaks it measures.

    Args:
        limit_gb: Kill the benchmark when its RSS passes this (None: never).
    """

    limit_gb: float | None = None
    log: Path = field(init=False)
    proc: subprocess.Popen[bytes] = field(init=False)

    def __post_init__(self) -> None:
        fd, name = tempfile.mkstemp(prefix="search_latency_rss_", suffix=".log")
        os.close(fd)
        self.log = Path(name)
        # A separate process: the engine's native calls hold the GIL for seconds, so a thread could not act.
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WATCHER, str(os.getpid()), str(self.limit_gb or 0), str(self.log)]
        )

    def stop(self) -> None:
        """Stops the watcher and removes its log."""
        self.proc.terminate()
        self.proc.wait()
        self.log.unlink(missing_ok=True)

    @contextmanager
    def phase(self, into: dict[str, Peak], name: str) -> Iterator[None]:
        """Measures the peak of the enclosed phase into `into[name]` (the kernel's high-water mark is reset at its
        start, so each phase has its own)."""
        _reset_hwm()
        t0 = time.time()
        try:
            yield
        finally:
            time.sleep(0.2)  # let the watcher log the phase's last sample
            t1 = time.time()
            peak = Peak(rss=_hwm_gb())
            for line in self.log.read_text().splitlines():
                parts = line.split()
                if len(parts) == 4 and t0 <= float(parts[0]) <= t1:
                    rss, anon, file = (int(x) / GB for x in parts[1:])
                    peak = peak.max(Peak(rss, anon, file))
            into[name] = peak


def _reset_hwm() -> None:
    """Resets this process's peak RSS (VmHWM), so the next reading is the peak since now (Linux >= 4.0)."""
    with contextlib.suppress(OSError):  # not Linux: the peak is then the process's peak so far
        Path("/proc/self/clear_refs").write_text("5")


def _hwm_gb() -> float:
    """This process's peak RSS since the last reset, in GB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def clustered(n: int, rng: np.random.Generator, centers: np.ndarray) -> np.ndarray:
    """Unit vectors scattered around unit cluster centres (noise of norm ~1: same-cluster cosines ~0.5, like real
    embeddings, where neighbours are close but far from identical)."""
    x = centers[rng.integers(0, len(centers), n)] + rng.normal(size=(n, DIM)).astype(np.float32) / np.sqrt(DIM)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def chunks(n: int, centers: np.ndarray, seed: int, size: int = CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """(start, vectors) chunks of the collection, each generated from its own seed: the same vectors every run, and
    never more than one chunk in memory."""
    for start in range(0, n, size):
        yield start, clustered(min(size, n - start), np.random.default_rng([seed, start]), centers)


def exact_top_k(n: int, centers: np.ndarray, queries: np.ndarray) -> list[list[str]]:
    """Ids of each query's exact top K by cosine, over the regenerated collection one chunk at a time (queries and
    vectors are unit vectors, so the dot product is the cosine): memory is one chunk of scores, at any size."""
    best = np.full((len(queries), K), -np.inf, np.float32)
    index = np.zeros((len(queries), K), np.int64)
    for start, vectors in chunks(n, centers, seed=1):
        scores = np.concatenate([best, queries @ vectors.T], axis=1)
        ids = np.concatenate([index, np.broadcast_to(np.arange(start, start + len(vectors)), scores[:, K:].shape)], 1)
        top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
        best, index = np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)
    return [[point_id("image", str(i)) for i in row] for row in index]


def fill(store: VectorStore, n: int, centers: np.ndarray, config: CollectionConfig, batch: int) -> tuple[float, float]:
    """Writes n generated vectors as image points and builds the index.

    Returns:
        Seconds spent writing, and seconds spent building indexes (the segments the store sealed on the way, and
        the final `optimize()`).
    """
    t0 = time.perf_counter()
    store.ensure_collection("bench", config, BENCH_IDENTITY)
    for start, vectors in chunks(n, centers, seed=1):
        for s in range(0, len(vectors), batch):
            store.upsert(
                "bench",
                [
                    PointData(point_id("image", str(start + i)), {"image": vectors[i]}, {"kind": "image"})
                    for i in range(s, min(s + batch, len(vectors)))
                ],
            )
    store.flush("bench")
    t1 = time.perf_counter()
    store.optimize("bench")
    t2 = time.perf_counter()
    index_s = store.optimize_seconds if isinstance(store, EdgeStore) else t2 - t1
    return t2 - t0 - index_s, index_s


def measure(store: VectorStore, queries: np.ndarray, options: SearchOptions) -> tuple[list[list[str]], np.ndarray]:
    """One query at a time (the interactive case): ids of the top K and per-query latency in ms."""
    ids, lat = [], []
    for q in queries:
        t0 = time.perf_counter()
        (hits,) = store.search("bench", q[None], "image", K, None, options, with_payload=False)
        lat.append((time.perf_counter() - t0) * 1000)
        ids.append([h.id for h in hits])
    return ids, np.array(lat)


def recall(found: list[list[str]], truth: list[list[str]]) -> float:
    """Mean fraction of the exact top K found."""
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


@dataclass(frozen=True)
class Settings:
    """What every collection of a run is built and measured with."""

    n_queries: int
    """Queries per measurement (one at a time)."""
    efs: list[int]
    """HNSW ef values swept."""
    oversampling: list[float]
    """Quantised collections: candidates x limit before rescoring, swept."""
    exact_queries: int
    """Queries timed with the engine's exact search (each one reads every vector)."""
    on_disk: bool = False
    """Original vectors memory-mapped (not loaded)."""
    max_segment_size: int | None = DEFAULT_MAX_SEGMENT_SIZE
    """KB of vectors per segment (the store seals a segment when it is full)."""
    batch: int = 2000
    """Points per upsert."""


def run(backend: str, n: int, quantization: str, s: Settings, tmp: Path, watch: MemoryWatch) -> list[Row]:
    """Builds one collection and measures it once per (oversampling, ef); peaks are this collection's own."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(max(16, n // 500), DIM)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    queries = clustered(s.n_queries, rng, centers)
    warmup = clustered(s.n_queries, rng, centers)
    truth = exact_top_k(n, centers, queries)
    store = open_store(tmp / f"{n}-{quantization}" if backend == "embedded" else ":memory:")
    # Index everything with HNSW (a low indexing threshold), as a collection of this size would be in production.
    config = CollectionConfig(
        dim=DIM,
        quantization=quantization,
        indexing_threshold=1,
        on_disk=s.on_disk,
        max_segment_size=s.max_segment_size,
    )
    peaks: dict[str, Peak] = {}
    with watch.phase(peaks, "build"):
        ingest_s, index_s = fill(store, n, centers, config, s.batch)
    segments = store.shard_info("bench").segments_count if isinstance(store, EdgeStore) else 1
    factors = s.oversampling if quantization != "none" else [1.0]
    measured = []
    with watch.phase(peaks, "search"):
        # The engine's exact search reads every vector (so it runs on a few queries): it also pages the original
        # vectors in, and the warm-up queries the graph, so the sweep measures a warm index, whatever ef comes first.
        exact_found, exact_lat = measure(store, queries[: s.exact_queries], SearchOptions(exact=True))
        measure(store, warmup, SearchOptions(hnsw_ef=max(s.efs), oversampling=max(factors)))
        for factor in factors:
            for ef in sorted(s.efs):
                found, lat = measure(store, queries, SearchOptions(hnsw_ef=ef, oversampling=factor))
                measured.append((factor, ef, recall(found, truth), lat))
    store.close()
    peak = peaks["build"].max(peaks["search"])
    rows: list[Row] = []
    for factor, ef, rec, lat in measured:
        rows.append(
            {
                "backend": backend,
                "n": n,
                "quantization": quantization,
                "oversampling": factor,
                "hnsw_ef": ef,
                "recall_at_10": round(rec, 4),
                "p50_ms": round(float(np.percentile(lat, 50)), 3),
                "p99_ms": round(float(np.percentile(lat, 99)), 3),
                "exact_p50_ms": round(float(np.percentile(exact_lat, 50)), 3),
                # Engine exact search vs the numpy top 10: 1.0 unless scores tie at rank 10.
                "exact_agreement": round(recall(exact_found, truth[: s.exact_queries]), 4),
                "build_s": round(ingest_s + index_s, 2),
                "ingest_s": round(ingest_s, 2),
                "index_s": round(index_s, 2),
                "segments": segments,
                "on_disk": s.on_disk,
                "max_segment_size_kb": s.max_segment_size,
                "peak_rss_gb": round(peak.rss, 2),
                "peak_anon_gb": round(peak.anon, 2),
                "peak_file_gb": round(peak.file, 2),
                "build_peak_rss_gb": round(peaks["build"].rss, 2),
                "search_peak_rss_gb": round(peaks["search"].rss, 2),
            }
        )
    return rows


def recommend(rows: list[Row], target: float) -> list[str]:
    """Per embedded collection and oversampling: the smallest ef whose recall reaches `target`, with its latency."""
    groups: dict[tuple[int, str, float], list[Row]] = {}
    for r in rows:
        if r["backend"] == "embedded":  # local mode is brute force: every ef is exact
            groups.setdefault((r["n"], r["quantization"], r["oversampling"]), []).append(r)
    out = []
    for (n, q, factor), mine in sorted(groups.items()):
        what = f"n={n} {q}" + (f" oversampling {factor:g}" if q != "none" else "")
        ok = [r for r in sorted(mine, key=lambda r: r["hnsw_ef"]) if r["recall_at_10"] >= target]
        if not ok:
            best = max(mine, key=lambda r: r["recall_at_10"])
            out.append(f"no ef reaches recall {target} for {what}: best {best['recall_at_10']} at ef {best['hnsw_ef']}")
            continue
        r = ok[0]
        out.append(
            f"recommended ef for {what}: {r['hnsw_ef']} (recall@10 {r['recall_at_10']} >= {target}, "
            f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms); build {r['build_s']} s = {r['ingest_s']} ingest + "
            f"{r['index_s']} index, {r['segments']} segments; peak RSS {r['peak_rss_gb']} GB (sampled peaks: "
            f"{r['peak_anon_gb']} GB anonymous, {r['peak_file_gb']} GB mapped files)"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--quantizations", nargs="+", default=["none", "int8", "binary"])
    p.add_argument("--client-sizes", type=int, nargs="*", default=[10_000], help="sizes for qdrant-client local mode")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--hnsw-ef", type=int, nargs="+", default=[16, 32, 64, 128, 256], help="HNSW ef values swept")
    p.add_argument("--oversampling", type=float, nargs="+", default=[1.0, 4.0], help="quantised: candidates x limit")
    p.add_argument("--target-recall", type=float, default=0.99, help="recommend the smallest ef reaching this")
    p.add_argument("--exact-queries", type=int, default=20, help="queries timed with the engine's exact search")
    p.add_argument("--on-disk", action="store_true", help="original vectors memory-mapped from disk (large sizes)")
    p.add_argument(
        "--max-segment-size-kb",
        type=int,
        default=DEFAULT_MAX_SEGMENT_SIZE,
        help="KB of vectors per segment: the store seals a segment when it is full (0: one segment, built at the end)",
    )
    p.add_argument("--batch", type=int, default=2000, help="points per upsert")
    p.add_argument("--max-rss-gb", type=float, default=None, help="kill the run if its RSS passes this")
    p.add_argument("--tag", default="", help="results file search_latency_<tag>.md (keeps the default run's file)")
    add_results_flag(p)
    args = p.parse_args(argv)
    watch = MemoryWatch(args.max_rss_gb)
    name = f"search_latency_{args.tag}" if args.tag else "search_latency"
    report = Report(name, argv, args.results, module="search_latency")
    settings = Settings(
        n_queries=args.queries,
        efs=args.hnsw_ef,
        oversampling=args.oversampling,
        exact_queries=min(args.exact_queries, args.queries),
        on_disk=args.on_disk,
        max_segment_size=args.max_segment_size_kb or None,
        batch=args.batch,
    )
    rows: list[Row] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for n in args.sizes:
                for q in args.quantizations:
                    for row in run("embedded", n, q, settings, Path(tmp), watch):
                        rows.append(row)
                        report.line(json.dumps(row))
            local = Settings(min(args.queries, 50), [max(args.hnsw_ef)], [1.0], min(args.exact_queries, 50))
            for n in args.client_sizes:
                for row in run("client-local", n, "none", local, Path(tmp), watch):
                    rows.append(row)
                    report.line(json.dumps(row))
    finally:
        watch.stop()
    cols = (
        "backend",
        "n",
        "quantization",
        "oversampling",
        "hnsw_ef",
        "recall_at_10",
        "p50_ms",
        "p99_ms",
        "exact_p50_ms",
        "ingest_s",
        "index_s",
        "segments",
        "peak_rss_gb",
        "peak_anon_gb",
        "peak_file_gb",
    )
    report.line()
    report.line(" ".join(f"{c:>13}" for c in cols))
    for r in rows:
        report.line(" ".join(f"{r[c]!s:>13}" for c in cols))
    report.line()
    for line in recommend(rows, args.target_recall):
        report.line(line)
    emb = {
        (r["n"], r["hnsw_ef"]): r
        for r in rows
        if r["backend"] == "embedded" and r["quantization"] == "none" and r["oversampling"] == 1.0
    }
    for r in rows:
        if r["backend"] == "client-local" and (r["n"], r["hnsw_ef"]) in emb:
            ratio = r["p50_ms"] / emb[(r["n"], r["hnsw_ef"])]["p50_ms"]
            report.line(f"client local mode / embedded HNSW (ef {r['hnsw_ef']}) p50 latency at {r['n']}: {ratio:.1f}x")
    report.save(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
