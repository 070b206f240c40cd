"""Dynamic batching vs batching off: 32 concurrent single-item clients against one service (target >= 3x, text).

Each client is a thread with its own channel sending one-item `Encode` requests back to back for a fixed number of
requests; the service runs as its own process, once with `--batching on` and once with `--batching off`.

    python -m benchmarks.services_batching --bundle BUNDLE [--modality text|image] [--clients 32] [--requests 20]
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.report import Report, add_results_flag
from benchmarks.samples import sample_items
from imgtxt.client import ImageEncoderClient, TextEncoderClient
from imgtxt.encoders.image import ImageEncoder
from imgtxt.encoders.session import available_cores
from imgtxt.encoders.text import TextEncoder
from imgtxt.supervisor import run_services

CLIENTS: dict[str, Any] = {"image": ImageEncoderClient, "text": TextEncoderClient}


def _load(modality: str, port: int, items: list[Any], clients: int, requests: int) -> tuple[float, np.ndarray]:
    """Runs the clients; returns (items/s, per-request latencies in seconds)."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    ready = threading.Barrier(clients + 1)

    def client(k: int) -> None:
        with CLIENTS[modality](f"127.0.0.1:{port}", timeout=120) as c:
            c.info()
            ready.wait()
            for j in range(requests):
                item = items[(k * requests + j) % len(items)]
                t0 = time.perf_counter()
                c.encode([item])
                latencies[k].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return clients * requests / elapsed, np.array([x for per in latencies for x in per])


def _model_batching_gain(
    modality: str, bundle: Path, items: list[Any], batch: int, server_flags: str
) -> tuple[float, float]:
    """In-process items/s at batch 1 and at `batch` (same thread setting as the servers)."""
    flags = server_flags.split()
    threads = int(flags[flags.index("--intra-op-threads") + 1]) if "--intra-op-threads" in flags else 0
    encoder_class = ImageEncoder if modality == "image" else TextEncoder
    with encoder_class.from_bundle(bundle, device="cpu", intra_op_threads=threads) as encoder:
        encoder.warm_up()
        rates = []
        for size in (1, batch):
            subset = items[: max(4 * size, 64)]
            start = time.perf_counter()
            for i in range(0, len(subset), size):
                encoder.encode(subset[i : i + size])
            rates.append(len(subset) / (time.perf_counter() - start))
    return rates[0], rates[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _where_time_goes(metrics_port: int) -> dict[str, float]:
    """Per-request milliseconds by stage, from the server's own Prometheus histograms (`imgtxt_encoder_*`).

    `inference` is the mean session run a request waits for (its whole batch's run); `other` is the rest of an
    Encode rpc: gRPC and protobuf work, the Python request path, waking up the waiting thread, and the GIL.
    """
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read().decode()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            key = s.labels.get("stage") or (
                s.labels.get("method") if family.name == "imgtxt_encoder_request_seconds" else None
            )
            if key is None or (family.name == "imgtxt_encoder_request_seconds" and key != "Encode"):
                continue
            if s.name.endswith("_sum"):
                sums[key] = s.value
            elif s.name.endswith("_count"):
                counts[key] = s.value
    per = {k: 1000 * sums[k] / counts[k] for k in sums if counts.get(k)}
    # inference is observed once per session run; every request of a batch waits for the whole run
    runs, requests = counts.get("inference", 0), counts.get("Encode", 0)
    if requests and runs:
        per["inference"] = 1000 * sums.get("inference", 0.0) / runs
        per["other"] = per.get("Encode", 0.0) - sum(per.get(k, 0.0) for k in ("queue", "preprocess", "inference"))
        per["requests_per_run"] = requests / runs
    return per


def main(argv: list[str] | None = None) -> int:
    """Prints throughput and p50/p99 latency with batching on and off, and the throughput ratio."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="model bundle directory")
    parser.add_argument("--modality", choices=("image", "text"), default="text")
    parser.add_argument("--clients", type=int, default=32, help="concurrent single-item clients")
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--max-batch", type=int, default=32, help="server --max-batch")
    parser.add_argument("--max-delay-us", type=int, default=2000, help="server --max-delay-us")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per mode; the best counts")
    parser.add_argument("--server-flags", default="", help="more flags for both servers, e.g. '--intra-op-threads 1'")
    add_results_flag(parser)
    args = parser.parse_args(argv)
    report = Report(f"services_batching_{args.modality}", argv, args.results, module="services_batching")
    items, source = sample_items(args.modality, 256)
    report.line(f"{args.modality}: {source}; {args.clients} clients x {args.requests} one-item requests")
    report.line(f"  {available_cores()} cores; server flags: {' '.join(args.server_flags.split()) or '(defaults)'}")
    rates = {}
    rows: list[dict[str, Any]] = []
    for mode in ("on", "off"):
        flags = ["--batching", mode, "--max-batch", str(args.max_batch), "--max-delay-us", str(args.max_delay_us)]
        flags += args.server_flags.split()
        metrics_port = _free_port()
        flags += ["--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1"]
        with run_services(args.bundle, extra_args=("--device", "cpu", *flags), modalities=(args.modality,)) as (svc,):
            port = svc.port
            _load(args.modality, port, items, args.clients, 2)  # warm-up: connections, first batches
            rate, lat = max(
                (_load(args.modality, port, items, args.clients, args.requests) for _ in range(args.repeats)),
                key=lambda r: r[0],
            )
            stages = _where_time_goes(metrics_port)
        rates[mode] = rate
        p50, p99 = np.percentile(lat, [50, 99]) * 1000
        rows.append({"batching": mode, "items_per_s": round(rate, 1), "p50_ms": round(p50, 1), "p99_ms": round(p99, 1)})
        report.line(f"  batching {mode:<3}  {rate:8.1f} items/s   p50 {p50:7.1f} ms   p99 {p99:7.1f} ms")
        report.line(
            "    per request: "
            + ", ".join(f"{k} {stages[k]:.2f} ms" for k in ("queue", "preprocess", "inference", "other") if k in stages)
            + f"; {stages.get('requests_per_run', 0):.1f} requests per session run"
        )
        rows[-1]["stages_ms"] = {k: round(v, 3) for k, v in stages.items()}
    report.line(f"  ratio batching on / off = {rates['on'] / rates['off']:.2f}x  (target >= 3x for the text tower)")
    one, full = _model_batching_gain(args.modality, args.bundle, items, args.max_batch, args.server_flags)
    report.line(f"  model alone, in-process: batch 1 {one:.1f} items/s, batch {args.max_batch} {full:.1f} items/s")
    report.line(f"  = {full / one:.2f}x: the most any batching can gain for this model on this machine")
    rows.append({"model_batch_1_per_s": round(one, 1), f"model_batch_{args.max_batch}_per_s": round(full, 1)})
    report.save(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
