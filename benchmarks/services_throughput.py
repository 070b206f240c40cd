"""Service throughput vs in-process ONNX Runtime: same bundle, precision, threads and batch size (target >= 0.95x).

The in-process baseline is the domain encoder (`ImageEncoder.encode` / `TextEncoder.encode`: shared preprocessing +
one session), batch after batch. The service runs as its own process (`python -m <modality>_encoder_service`) and is
fed by one `encode_stream` of the same items in chunks of the same size; both share this machine's cores.

    python -m benchmarks.services_throughput --bundle BUNDLE [--modality image|text|both] [--items 512] [--batch 32]
        [--precision auto]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from benchmarks.report import Report, add_results_flag
from benchmarks.samples import sample_items
from imgtxt.client import ImageEncoderClient, TextEncoderClient
from imgtxt.encoders.image import ImageEncoder
from imgtxt.encoders.session import SessionConfig, available_cores
from imgtxt.encoders.text import TextEncoder
from imgtxt.encoders.tower import TowerEncoder
from imgtxt.supervisor import run_services

ENCODERS: dict[str, type[TowerEncoder[Any, Any]]] = {"image": ImageEncoder, "text": TextEncoder}
CLIENTS: dict[str, Any] = {"image": ImageEncoderClient, "text": TextEncoderClient}
TARGET = 0.95
"""Issue 26 item 4: the service reaches at least this share of the in-process rate at batch 32."""


def _rate(run: Any, items: list[Any]) -> float:
    start = time.perf_counter()
    n = run(items)
    assert n == len(items)
    return n / (time.perf_counter() - start)


def measure(
    modality: str, bundle: Path, items: list[Any], batch: int, threads: int, repeats: int, precision: str = "auto"
) -> tuple[float, float, str]:
    """Best-of-`repeats` items/s in-process and through the service, measured alternately (fair under noisy load),
    and the precision both ran at."""
    flags = ("--intra-op-threads", str(threads), "--max-batch", str(batch), "--precision", precision)
    with (
        ENCODERS[modality].from_bundle(bundle, device="cpu", intra_op_threads=threads, precision=precision) as encoder,
        run_services(bundle, extra_args=("--device", "cpu", *flags), modalities=(modality,)) as (svc,),
        CLIENTS[modality](svc.target) as client,
    ):

        def local(xs: list[Any]) -> int:
            return sum(len(encoder.encode(xs[i : i + batch])) for i in range(0, len(xs), batch))

        def remote(xs: list[Any]) -> int:
            return sum(len(r) for r in client.encode_stream(iter(xs), chunk_size=batch))

        local(items[: 2 * batch]), remote(items[: 2 * batch])  # warm-up
        rates = [(_rate(local, items), _rate(remote, items)) for _ in range(repeats)]
        served = client.info().precision
    if served != encoder.precision:
        raise RuntimeError(f"the service serves {served}, the in-process encoder {encoder.precision}")
    return max(r[0] for r in rates), max(r[1] for r in rates), served


def main(argv: list[str] | None = None) -> int:
    """Prints items/s in-process and through the service, and their ratio, per modality."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="model bundle directory")
    parser.add_argument("--modality", choices=("image", "text", "both"), default="both")
    parser.add_argument("--items", type=int, default=512, help="items per measurement")
    parser.add_argument("--batch", type=int, default=32, help="items per session run / stream chunk")
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: the services' default)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements; the best of each counts")
    parser.add_argument(
        "--precision", default="auto", help="graphs both run (auto: what the service serves by default)"
    )
    add_results_flag(parser)
    args = parser.parse_args(argv)
    report = Report("services_throughput", argv, args.results)
    rows = []
    threads = SessionConfig(intra_op_threads=args.threads).resolved_intra_op_threads
    for modality in ("image", "text") if args.modality == "both" else (args.modality,):
        items, source = sample_items(modality, args.items)
        local, remote, precision = measure(
            modality, args.bundle, items, args.batch, threads, args.repeats, args.precision
        )
        report.line(
            f"{modality}: {source}, batch {args.batch}, {precision}, {threads} ORT threads, {available_cores()} cores"
        )
        report.line(f"  best of {args.repeats} alternating runs each")
        report.line(f"  in-process ORT  {local:9.1f} items/s")
        report.line(f"  service stream  {remote:9.1f} items/s")
        report.line(f"  ratio service / in-process = {remote / local:.2f}x  (target >= {TARGET}x)")
        rows.append(
            {
                "modality": modality,
                "precision": precision,
                "in_process_per_s": round(local, 1),
                "service_per_s": round(remote, 1),
                "ratio": round(remote / local, 3),
            }
        )
    report.save(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
