"""Search latency through the search service's HTTP and gRPC sides, as ratios to the library call, 1 and N clients.

    .venv/bin/python -m benchmarks.search_service --bundle BUNDLE [--data ../shared/data/flickr8k] [--images 300]
        [--queries 200] [--clients 1,32]

The same backend (the bundle's towers in-process + an embedded Qdrant index of the val images) answers all three
ways, so the ratios are the transport's cost: HTTP (FastAPI on uvicorn, JSON) and gRPC (protobuf) against calling
`SearchBackend.search` directly, with the same text queries, in one run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from benchmarks.report import Report, add_results_flag
from imgtxt.datasets import default_data_root, load_captioned_images
from imgtxt.encoders.bundle import BundleEncoder
from imgtxt.encoders.session import SessionConfig
from imgtxt.v1 import search_pb2 as pb
from imgtxt.v1 import search_pb2_grpc as pb_grpc
from indexer import IndexConfig, read_records, run_index
from search.backend import Query, SearchBackend
from search_service.server import SearchServerConfig, create_search_server
from store.base import CollectionConfig
from store.factory import open_store


def _load(call: Callable[[str], object], queries: list[str], clients: int) -> np.ndarray:
    """Per-query latencies (seconds) with `clients` threads sharing the queries."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    ready = threading.Barrier(clients + 1)

    def run(k: int) -> None:
        ready.wait()
        for q in queries[k::clients]:
            t0 = time.perf_counter()
            call(q)
            latencies[k].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    for t in threads:
        t.join()
    return np.array([x for per in latencies for x in per])


def main(argv: list[str] | None = None) -> int:
    """Indexes, serves, measures, prints the table and writes the results file."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--images", type=int, default=300, help="val images indexed")
    p.add_argument("--queries", type=int, default=200, help="text queries per measurement")
    p.add_argument("--clients", default="1,32", help="comma list of concurrent clients")
    p.add_argument("--limit", type=int, default=10, help="hits per search")
    add_results_flag(p)
    args = p.parse_args(argv)
    report = Report("search_service", argv, args.results)
    items = load_captioned_images(args.data, split="val", limit=args.images)
    queries = [c for it in items for c in it.captions][: args.queries]
    rows = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        BundleEncoder.from_bundle(args.bundle, SessionConfig(device="cpu")) as enc,
    ):
        store = open_store(Path(tmp) / "q")
        cfg = IndexConfig(kinds=("image", "text"), progress=False)
        records = read_records(args.data, split="val", limit=args.images)
        run_index(records, enc, store, "bench", CollectionConfig(dim=enc.dim), cfg)
        backend = SearchBackend(store, enc, "bench")
        server = create_search_server(SearchServerConfig(port=0, http_port=0), backend)
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        stub = pb_grpc.SearchServiceStub(channel)
        url = f"http://127.0.0.1:{server.http_port}/v1/search"

        def library(q: str) -> object:
            return backend.search(Query(text=q, limit=args.limit))

        def over_grpc(q: str) -> object:
            return stub.Search(pb.SearchRequest(text=q, limit=args.limit), timeout=60)

        def over_http(q: str) -> object:
            body = json.dumps({"text": q, "limit": args.limit}).encode()
            request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.read()

        try:
            for fn in (library, over_grpc, over_http):
                _load(fn, queries[:20], 4)  # warm-up: sessions, connections, caches
            report.line(f"{len(items)} val images indexed, {len(queries)} caption queries, limit {args.limit}")
            report.line(f"{'clients':>7} {'path':>8} {'p50 ms':>8} {'p99 ms':>8} {'qps':>8} {'p50 / library':>14}")
            for clients in (int(c) for c in args.clients.split(",")):
                base = None
                for name, fn in (("library", library), ("grpc", over_grpc), ("http", over_http)):
                    t0 = time.perf_counter()
                    lat = _load(fn, queries, clients)
                    qps = len(lat) / (time.perf_counter() - t0)
                    p50, p99 = (float(v) for v in np.percentile(lat, [50, 99]) * 1000)
                    base = base or p50
                    row = {
                        "clients": clients,
                        "path": name,
                        "p50_ms": round(p50, 2),
                        "p99_ms": round(p99, 2),
                        "qps": round(qps, 1),
                        "p50_ratio": round(p50 / base, 2),
                    }
                    rows.append(row)
                    report.line(f"{clients:>7} {name:>8} {p50:>8.2f} {p99:>8.2f} {qps:>8.1f} {p50 / base:>13.2f}x")
        finally:
            channel.close()
            server.stop(grace=0)
            store.close()
    report.save(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
