"""Our services' own Prometheus figures, read by the service benchmarks: where a request's time goes."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

STAGES = ("queue", "preprocess", "inference", "Encode")
"""Stages with a mean time per observation (`Encode`: the whole rpc)."""


def scrape(port: int) -> dict[str, float]:
    """Our service's stage/rpc/batch histogram sums and counts, keyed `<stage|method|batch>_<sum|count>`."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    out: dict[str, float] = {}
    names = {
        "imgtxt_encoder_stage_seconds": "stage",
        "imgtxt_encoder_request_seconds": "method",
        "imgtxt_encoder_batch_size": None,
    }
    for family in text_string_to_metric_families(body):
        if family.name not in names:
            continue
        label = names[family.name]
        for s in family.samples:
            key = s.labels.get(label, "") if label else "batch"
            if key and s.name.endswith(("_sum", "_count")):
                out[f"{key}_{s.name.rsplit('_', 1)[1]}"] = s.value
    return out


def add(total: dict[str, float], more: dict[str, float], sign: int) -> dict[str, float]:
    """`total + sign * more`, key by key."""
    return {k: total.get(k, 0.0) + sign * more.get(k, 0.0) for k in {*total, *more}}


def stage_breakdown(delta: dict[str, float]) -> dict[str, float]:
    """Our service's mean ms per stage and items per session run, from `/metrics` sums and counts over a period.

    `delta` maps `<stage>_sum` / `<stage>_count` (queue, preprocess, inference; `Encode` for the whole rpc;
    `batch` for items per run) to their growth over the period. `inference` is the mean session run a request waits
    for (every request of a batch waits for the whole run); `queue` is per request (a request that ran alone, as
    adaptive batching runs one on an idle service, waited 0); `other` is the rest of an Encode rpc: gRPC, protobuf,
    the Python request path, waking up, the GIL.
    """
    mean = {k: 1000 * delta[f"{k}_sum"] / delta[f"{k}_count"] for k in STAGES if delta.get(f"{k}_count")}
    if "Encode" not in mean or "inference" not in mean:
        return {}
    out = {k: mean.get(k, 0.0) for k in ("queue", "preprocess", "inference")}
    if delta.get("queue_count"):  # per request: one run alone (adaptive batching) waited in no queue
        out["queue"] = 1000 * delta["queue_sum"] / delta["Encode_count"]
    out["other"] = mean["Encode"] - sum(out.values())
    if delta.get("batch_count"):
        out["items_per_run"] = delta["batch_sum"] / delta["batch_count"]
    return out
