"""int8 vs fp32 per tower: throughput at batch 1 and 32 as ratios measured in one run, and the R@K change on val.

    .venv/bin/python -m benchmarks.int8_serving --bundle BUNDLE [--data ../shared/data/flickr8k] [--limit 1000]
        [--threads 0] [--repeats 3]

The bundle needs int8 graphs (`imgtxt export --int8`). Throughput is the session run alone over prepared inputs
(the same items for both precisions, alternating, best of `--repeats`); R@K is `imgtxt eval --bundle`'s protocol on
the val split with every combination of image and text precision. The CPU's int8 instruction support decides the
gain (VNNI: AVX512-VNNI or AVX-VNNI; AMX-INT8), so it is printed with the figures.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import Report, add_results_flag
from evaluation.offline import encode_all
from imgtxt.bundle import load_bundle
from imgtxt.datasets import default_data_root, load_captioned_images
from imgtxt.encoders.image import ImageEncoder
from imgtxt.encoders.session import SessionConfig, default_cache_dir
from imgtxt.encoders.text import TextEncoder
from imgtxt.retrieval_metrics import retrieval_metrics

INT8_FLAGS = ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def cpu_int8_support() -> str:
    """The CPU's int8-relevant instruction sets, from /proc/cpuinfo."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    have = set(flags.split(":", 1)[1].split())
    return ", ".join(f"{f} {'yes' if f in have else 'no'}" for f in INT8_FLAGS)


def _throughput(encoder: Any, features: list[Any], batch: int, repeats: int) -> float:
    """Items per second of the session alone over prepared features."""
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, len(features), batch):
            encoder.run(features[i : i + batch])
        best = max(best, len(features) / (time.perf_counter() - t0))
    return best


def main(argv: list[str] | None = None) -> int:
    """Measures, prints the tables and writes the results file."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--limit", type=int, default=None, help="first N val images (default: all)")
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: the services' default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--speed-items", type=int, default=128, help="items per throughput measurement")
    add_results_flag(p)
    args = p.parse_args(argv)
    report = Report("int8_serving", argv, args.results)
    bundle = load_bundle(args.bundle)
    cfg = SessionConfig(device="cpu", intra_op_threads=args.threads, cache_dir=default_cache_dir())
    records = load_captioned_images(args.data, split="val", limit=args.limit)
    captions = [c for r in records for c in r.captions]
    owners = np.array([i for i, r in enumerate(records) for _ in r.captions])
    report.line(f"CPU int8 support: {cpu_int8_support()}; {cfg.resolved_intra_op_threads} ORT threads")
    rows: list[dict[str, Any]] = []
    embeddings: dict[tuple[str, str], np.ndarray] = {}
    report.line(f"{'tower':>6} {'batch':>6} {'fp32 /s':>9} {'int8 /s':>9} {'int8/fp32':>10}")
    for modality, cls in (("image", ImageEncoder), ("text", TextEncoder)):
        encoders = {prec: cls.from_session_config(bundle, cfg, prec) for prec in ("fp32", "int8")}
        if modality == "image":
            items: list[Any] = [r.path.read_bytes() for r in records[: args.speed_items]]
        else:
            items = captions[: args.speed_items]
        features = encoders["fp32"].prepare(items).good
        for batch in (1, 32):
            for enc in encoders.values():
                enc.run(features[:batch])  # warm-up
            rates = {prec: _throughput(enc, features, batch, args.repeats) for prec, enc in encoders.items()}
            ratio = rates["int8"] / rates["fp32"]
            rows.append(
                {
                    "tower": modality,
                    "batch": batch,
                    **{f"{k}_per_s": round(v, 1) for k, v in rates.items()},
                    "ratio": round(ratio, 2),
                }
            )
            report.line(f"{modality:>6} {batch:>6} {rates['fp32']:>9.1f} {rates['int8']:>9.1f} {ratio:>9.2f}x")
        for prec, enc in encoders.items():
            if modality == "image":
                fn = lambda chunk, e=enc: e.encode([p.read_bytes() for p in chunk])  # noqa: E731
                embeddings[(modality, prec)] = encode_all(fn, [r.path for r in records], 32, f"{prec} images")
            else:
                text_fn = lambda chunk, e=enc: e.encode(chunk)  # noqa: E731
                embeddings[(modality, prec)] = encode_all(text_fn, captions, 128, f"{prec} captions")
            enc.close()
    report.line()
    report.line(f"val ({len(records)} images x {len(captions)} captions), R@K by image / text precision:")
    report.line(f"{'image':>6} {'text':>6} " + " ".join(f"{k:>8}" for k in KEYS) + f" {'d rSum':>7}")
    base = None
    for image_prec in ("fp32", "int8"):
        for text_prec in ("fp32", "int8"):
            m = retrieval_metrics(embeddings[("image", image_prec)] @ embeddings[("text", text_prec)].T, owners)
            base = base if base is not None else m["rsum"]
            delta = m["rsum"] - base
            rows.append(
                {
                    "image": image_prec,
                    "text": text_prec,
                    **{k: round(m[k], 2) for k in KEYS},
                    "delta_rsum": round(delta, 2),
                }
            )
            cells = " ".join(f"{m[k]:>8.2f}" for k in KEYS)
            report.line(f"{image_prec:>6} {text_prec:>6} {cells} {delta:>+7.2f}")
    report.line("recommendation: serve a tower at int8 only where its rSum loss is at most 0.5 and its ratio > 1")
    report.save(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
