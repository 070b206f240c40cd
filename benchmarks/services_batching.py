"""Dynamic batching vs batching off: 32 concurrent single-item clients against one service (target >= 3x, text).

Each client is a thread with its own channel sending one-item `Encode` requests back to back for a fixed number of
requests; the service runs as its own process, once with `--batching on` and once with `--batching off`.

In the same run the model alone, in-process, gives the ceiling, measured like for like: each mode's session is built
from the same flags by the same code as the service's, and called with the service's parallelism (batch 1 from as many
concurrent callers as the unbatched service runs requests at once; batch `--max-batch` from as many callers as the
batched service has batch workers). Target (issue 17): batching on / off >= 0.9 of that batch-N / batch-1 gain.

    python -m benchmarks.services_batching --bundle BUNDLE [--modality text|image] [--clients 32] [--requests 20]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.concurrency import free_port, run_callers
from benchmarks.report import Report, add_results_flag
from benchmarks.samples import sample_items
from benchmarks.server_metrics import add, scrape, stage_breakdown
from imgtxt.bundle import load_bundle
from imgtxt.client import ImageEncoderClient, TextEncoderClient
from imgtxt.encoders.image import ImageEncoder
from imgtxt.encoders.session import CPU, available_cores
from imgtxt.encoders.text import TextEncoder
from imgtxt.encoders.tower import TowerEncoder
from imgtxt.preprocess import ImageLimits
from imgtxt.serving.config import add_server_flags, server_config_from_args, session_config_from_args
from imgtxt.supervisor import run_services

CLIENTS: dict[str, Any] = {"image": ImageEncoderClient, "text": TextEncoderClient}
TARGET_SHARE = 0.9
"""Issue 17: the batched service reaches at least this share of the model's own batching gain."""


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (all its threads); nan without Linux's /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load(modality: str, port: int, items: list[Any], clients: int, requests: int) -> dict[str, Any]:
    """Runs the clients; returns items/s, per-request latencies (s), the wall time and the clients' CPU seconds."""
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
    start, cpu = time.perf_counter(), time.process_time()  # this process runs nothing but the clients meanwhile
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return {
        "rate": clients * requests / elapsed,
        "latencies": np.array([x for per in latencies for x in per]),
        "elapsed": elapsed,
        "client_cpu": time.process_time() - cpu,
    }


def _service_args(modality: str, bundle: Path, mode: str, flags: list[str]) -> argparse.Namespace:
    """The service's own flags, parsed by the service's own parser (so defaults resolve exactly as they do there)."""
    parser = argparse.ArgumentParser()
    add_server_flags(parser, modality)
    return parser.parse_args(["--bundle", str(bundle), "--device", "cpu", "--batching", mode, *flags])


def _open_encoder(modality: str, args: argparse.Namespace) -> TowerEncoder[Any, Any]:
    """The encoder the service builds from `args`: same session settings, same precision, same image options."""
    bundle = load_bundle(args.bundle, verify=False)
    cfg = session_config_from_args(args)
    if modality == "image":
        limits = ImageLimits(max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels)
        return ImageEncoder.from_session_config(
            bundle, cfg, args.precision, limits=limits, preprocess_threads=args.preprocess_threads
        )
    return TextEncoder.from_session_config(bundle, cfg, args.precision)


def _model_rate(
    encoder: TowerEncoder[Any, Any], items: list[Any], batch: int, callers: int, repeats: int
) -> dict[str, float]:
    """In-process items/s and CPU ms per item of `encode()` over all `items` in batches of `batch` from `callers`
    concurrent threads (the best of `repeats`)."""
    batches = [items[i : i + batch] for i in range(0, len(items), batch)]
    best = {"rate": 0.0, "cpu_ms": float("nan")}
    for _ in range(repeats):
        cpu = time.process_time()
        rate = len(items) / run_callers(encoder.encode, batches, callers)
        if rate > best["rate"]:
            best = {"rate": rate, "cpu_ms": 1000 * (time.process_time() - cpu) / len(items)}
    return best


def _where_time_goes(
    before: dict[str, float], after: dict[str, float], elapsed: float, workers: int
) -> dict[str, float]:
    """Per-request milliseconds by stage over one measurement, from the server's own Prometheus histograms
    (`server_metrics.stage_breakdown`; one item per request here, so items per run are requests per run).

    `session_busy` is the share of the wall time the service's `workers` run slots (batch workers, or rpc threads
    with batching off) spend in session runs: near 1 with batching on, the session itself is the bottleneck; well
    below, requests reach it too slowly.
    """
    delta = add(after, before, -1)
    per = stage_breakdown(delta)
    if per and not delta.get("queue_count"):  # batching off: requests never queue
        del per["queue"]
    if per:
        per["requests_per_run"] = per.pop("items_per_run", 1.0)
        per["session_busy"] = delta["inference_sum"] / (elapsed * workers)
    return per


def _measure_service(args: argparse.Namespace, mode: str, items: list[Any], workers: int) -> dict[str, Any]:
    """One service process with `--batching mode`: warm-up, then the best of `--repeats` loads, with its stage times
    and the CPU the server and the clients used per item."""
    flags = ["--batching", mode, "--max-batch", str(args.max_batch), "--max-delay-us", str(args.max_delay_us)]
    flags += args.server_flags.split()
    metrics_port = free_port()
    flags += ["--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1"]
    best: dict[str, Any] = {"rate": 0.0}
    with run_services(args.bundle, extra_args=("--device", "cpu", *flags), modalities=(args.modality,)) as (svc,):
        _load(args.modality, svc.port, items, args.clients, 2)  # warm-up: connections, first batches
        for _ in range(args.repeats):
            scraped, server_cpu = scrape(metrics_port), _cpu_seconds(svc.process.pid)
            load = _load(args.modality, svc.port, items, args.clients, args.requests)
            load["server_cpu"] = _cpu_seconds(svc.process.pid) - server_cpu
            load["stages"] = _where_time_goes(scraped, scrape(metrics_port), load["elapsed"], workers)
            if load["rate"] > best["rate"]:
                best = load
    n = args.clients * args.requests
    best["cpu_ms"] = {"server": 1000 * best["server_cpu"] / n, "clients": 1000 * best["client_cpu"] / n}
    return best


def _measure_models(
    args: argparse.Namespace, items: list[Any], plan: dict[str, Any], mean_batch: int
) -> dict[str, dict[str, float]]:
    """The model alone, in-process, on the sessions the services build: like for like (each mode's session, called
    with its service's parallelism), at the batched service's mean run, and one caller at a time (the earlier
    reference: the unbatched session, batch 1 and `--max-batch`, called sequentially)."""
    batch, repeats = args.max_batch, args.repeats
    with _open_encoder(args.modality, plan["off_args"]) as encoder:
        encoder.warm_up()
        out = {
            "one_alone": _model_rate(encoder, items, 1, plan["off_callers"], repeats),
            "one_single": _model_rate(encoder, items, 1, 1, repeats),
            "full_single": _model_rate(encoder, items, batch, 1, repeats),
        }
    with _open_encoder(args.modality, plan["on_args"]) as encoder:
        encoder.warm_up()
        out["full_alone"] = _model_rate(encoder, items, batch, plan["on_workers"], repeats)
        out["mean_alone"] = _model_rate(encoder, items, mean_batch, plan["on_workers"], repeats)
    return out


def _plan(args: argparse.Namespace) -> dict[str, Any]:
    """What each service runs, resolved by the services' own code: session threads, and session runs in flight."""
    common = ["--max-batch", str(args.max_batch), *args.server_flags.split()]
    on_args = _service_args(args.modality, args.bundle, "on", common)
    off_args = _service_args(args.modality, args.bundle, "off", common)
    on_threads = session_config_from_args(on_args).resolved_intra_op_threads
    return {
        "on_args": on_args,
        "off_args": off_args,
        "on_threads": on_threads,
        "off_threads": session_config_from_args(off_args).resolved_intra_op_threads,
        "on_workers": server_config_from_args(on_args).resolved_batch_workers(CPU, on_threads),  # they run on CPU
        # Batching off, every rpc runs its own session run in its own gRPC thread.
        "off_callers": min(args.clients, server_config_from_args(off_args).max_workers),
    }


def main(argv: list[str] | None = None) -> int:
    """Prints throughput, latency and where the time goes with batching on and off, the model's own batching gain
    measured like for like, and the share of that gain the batched service reaches (target >= 0.9)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="model bundle directory")
    parser.add_argument("--modality", choices=("image", "text"), default="text")
    parser.add_argument("--clients", type=int, default=32, help="concurrent single-item clients")
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--max-batch", type=int, default=32, help="server --max-batch")
    parser.add_argument("--max-delay-us", type=int, default=2000, help="server --max-delay-us")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per mode and reference; the best counts")
    parser.add_argument("--server-flags", default="", help="more flags for both servers, e.g. '--batch-workers 1'")
    add_results_flag(parser)
    args = parser.parse_args(argv)
    report = Report(f"services_batching_{args.modality}", argv, args.results, module="services_batching")
    items, source = sample_items(args.modality, 256)
    plan = _plan(args)
    report.line(f"{args.modality}: {source}; {args.clients} clients x {args.requests} one-item requests")
    report.line(f"  {available_cores()} cores; server flags: {' '.join(args.server_flags.split()) or '(defaults)'}")
    runs_at_once = {
        "on": f"{plan['on_workers']} batch worker(s) x {plan['on_threads']} ORT thread(s)",
        "off": f"a session run per rpc, up to {plan['off_callers']} at once x {plan['off_threads']} ORT thread(s)",
    }
    service: dict[str, dict[str, Any]] = {}
    for mode in ("on", "off"):
        workers = plan["on_workers"] if mode == "on" else plan["off_callers"]
        service[mode] = s = _measure_service(args, mode, items, workers)
        p50, p99 = np.percentile(s["latencies"], [50, 99]) * 1000
        s["p50"], s["p99"] = p50, p99
        stages = s["stages"]
        report.line(
            f"  batching {mode:<3}  {s['rate']:8.1f} items/s   p50 {p50:7.1f} ms   p99 {p99:7.1f} ms"
            f"   ({runs_at_once[mode]})"
        )
        report.line(
            "    per request: "
            + ", ".join(f"{k} {stages[k]:.2f} ms" for k in ("queue", "preprocess", "inference", "other") if k in stages)
            + f"; {stages.get('requests_per_run', 0):.1f} requests per session run;"
            + f" its {workers} run slot(s) busy {stages.get('session_busy', 0):.0%} of the time"
        )
    ratio = service["on"]["rate"] / service["off"]["rate"]
    report.line(f"  ratio batching on / off = {ratio:.2f}x  (target >= 3x for the text tower)")

    # The batched service's runs hold fewer than max_batch items (its clients are busy with their last answers):
    # the model alone at that mean batch splits the batched service's loss into batch formation and serving.
    mean_batch = min(args.max_batch, max(1, round(service["on"]["stages"].get("requests_per_run", 1))))
    models = _measure_models(args, items, plan, mean_batch)
    rows = _report(report, args, plan, service, models, mean_batch)
    report.save(rows)
    return 0


def _report(
    report: Report,
    args: argparse.Namespace,
    plan: dict[str, Any],
    service: dict[str, dict[str, Any]],
    models: dict[str, dict[str, float]],
    mean_batch: int,
) -> list[dict[str, Any]]:
    """Prints the model references, where each service's CPU goes, and the verdict; returns the JSON rows."""
    batch = args.max_batch
    one, full, mean = models["one_alone"], models["full_alone"], models["mean_alone"]
    one_single, full_single = models["one_single"], models["full_single"]
    report.line("  model alone, in-process, like for like (each mode's session, called as its service calls it):")
    report.line(
        f"    batch 1 from {plan['off_callers']} concurrent callers x {plan['off_threads']} ORT thread(s):"
        f" {one['rate']:.1f} items/s"
    )
    report.line(
        f"    batch {batch} from {plan['on_workers']} concurrent caller(s) x {plan['on_threads']} ORT thread(s):"
        f" {full['rate']:.1f} items/s"
    )
    gain = full["rate"] / one["rate"]
    report.line(f"    = {gain:.2f}x: the most batching can gain for this model on this machine")
    report.line(f"    batch {mean_batch} (the batched service's mean run), same callers: {mean['rate']:.1f} items/s")
    old_gain = full_single["rate"] / one_single["rate"]
    report.line(
        f"  model alone, one caller at a time x {plan['off_threads']} ORT thread(s) (the earlier reference):"
        f" batch 1 {one_single['rate']:.1f} items/s, batch {batch} {full_single['rate']:.1f} items/s"
        f" = {old_gain:.2f}x"
    )
    on, off = service["on"], service["off"]
    formation, serving = mean["rate"] / full["rate"], on["rate"] / mean["rate"]
    eff_on, eff_off = on["rate"] / full["rate"], off["rate"] / one["rate"]
    report.line(
        f"  service / model alone: batching on {eff_on:.2f} of batch {batch} (= {formation:.2f} batch formation"
        f" x {serving:.2f} serving at batch {mean_batch}), off {eff_off:.2f} of batch 1"
    )
    report.line("  CPU per item: the server process = the model alone at the service's batch + the rest; the clients")
    for mode, model in (("on", mean), ("off", one)):
        cpu = service[mode]["cpu_ms"]
        report.line(
            f"    batching {mode:<3}  server {cpu['server']:.2f} ms = model {model['cpu_ms']:.2f} ms"
            f" + {cpu['server'] - model['cpu_ms']:.2f} ms (gRPC, protobuf, Python request path, threads);"
            f" clients {cpu['clients']:.2f} ms"
        )
    ratio = on["rate"] / off["rate"]
    share, old_share = ratio / gain, ratio / old_gain
    verdict = "met" if share >= TARGET_SHARE else "NOT met"
    report.line(
        f"  share of the model's gain reached = (on / off) / gain = {share:.2f} of the like-for-like {gain:.2f}x"
        f" (target >= {TARGET_SHARE}: {verdict}); {old_share:.2f} of the one-caller {old_gain:.2f}x"
    )
    rows: list[dict[str, Any]] = [
        {
            "batching": mode,
            "items_per_s": round(service[mode]["rate"], 1),
            "p50_ms": round(service[mode]["p50"], 1),
            "p99_ms": round(service[mode]["p99"], 1),
            "stages_ms": {k: round(v, 3) for k, v in service[mode]["stages"].items()},
            "cpu_ms_per_item": {k: round(v, 3) for k, v in service[mode]["cpu_ms"].items()},
        }
        for mode in ("on", "off")
    ]
    rows.append(
        {
            "model_like_for_like": {
                "batch_1": {"callers": plan["off_callers"], "intra_op_threads": plan["off_threads"], **_rounded(one)},
                f"batch_{batch}": {
                    "callers": plan["on_workers"],
                    "intra_op_threads": plan["on_threads"],
                    **_rounded(full),
                },
                f"batch_{mean_batch}_service_mean": _rounded(mean),
                "gain": round(gain, 3),
            },
            "model_one_caller": {
                "intra_op_threads": plan["off_threads"],
                "batch_1": _rounded(one_single),
                f"batch_{batch}": _rounded(full_single),
                "gain": round(old_gain, 3),
            },
            "service_ratio": round(ratio, 3),
            "efficiency": {"on": round(eff_on, 3), "off": round(eff_off, 3)},
            "on_batch_formation": round(formation, 3),
            "on_serving": round(serving, 3),
            "share_of_gain": round(share, 3),
            "share_of_one_caller_gain": round(old_share, 3),
            "target_share": TARGET_SHARE,
            "target_met": bool(share >= TARGET_SHARE),
        }
    )
    return rows


def _rounded(measured: dict[str, float]) -> dict[str, float]:
    return {"items_per_s": round(measured["rate"], 1), "cpu_ms_per_item": round(measured["cpu_ms"], 3)}


if __name__ == "__main__":
    raise SystemExit(main())
