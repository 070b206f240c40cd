"""int8 vs fp32 per tower: throughput at batch 1 and 32 as ratios measured in one run, and the R@K change on val.

    .venv/bin/python -m benchmarks.int8_serving --bundle BUNDLE [--data ../shared/data/flickr8k] [--limit 1000]
        [--threads 0] [--repeats 5] [--variants] [--label RECIPE]

The bundle needs int8 graphs (`imgtxt export --int8`). Throughput is the session run alone over prepared inputs
(the same items for both precisions, alternating, best of `--repeats`); R@K is `imgtxt eval --bundle`'s protocol on
the val split with every combination of image and text precision. The CPU's int8 instruction support decides the
gain (VNNI: AVX512-VNNI or AVX-VNNI; AMX-INT8), so it is printed with the figures, and so is what
`--precision auto` serves from the checks the bundle's export recorded.

`--variants` (needs the `[train]` extra) also quantises the bundle's fp32 image tower with each recipe of
`VARIANTS` (`trainer.export.int8.quantize_image_static`: which parts stay in float, which calibration), calibrated
like the export (`--calibration-images` training images), and reports each one's val rSum (text at fp32) and speed
against fp32: the measurements behind the export's recipe.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import Report, add_results_flag
from imgtxt.bundle import load_bundle
from imgtxt.datasets import default_data_root, load_captioned_images
from imgtxt.encoders.bulk import encode_all
from imgtxt.encoders.image import ImageEncoder
from imgtxt.encoders.session import CPU, SessionConfig, choose_precision, create_session, default_cache_dir
from imgtxt.encoders.text import TextEncoder
from imgtxt.retrieval_metrics import retrieval_metrics

INT8_FLAGS = ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
VARIANTS: dict[str, tuple[tuple[str, ...], str]] = {
    "all int8": ((), "MinMax"),
    "head in float": (("head",), "MinMax"),
    "stem in float": (("stem",), "MinMax"),
    "stem + head in float": (("stem", "head"), "MinMax"),
    "stem + first block + head (the export's)": (("stem", "first_block", "head"), "MinMax"),
}
"""Image-tower recipes of `--variants`: name -> (parts kept in float, calibration method)."""


def cpu_int8_support() -> str:
    """The CPU's int8-relevant instruction sets, from /proc/cpuinfo."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    have = set(flags.split(":", 1)[1].split())
    return ", ".join(f"{f} {'yes' if f in have else 'no'}" for f in INT8_FLAGS)


def _throughput(encoders: dict[str, Any], features: list[Any], batch: int, repeats: int) -> dict[str, float]:
    """Items per second of each session alone over prepared features: one pass each in turn (fp32, int8, then int8,
    fp32, ...), `repeats` times, the best pass of each counting, so a change in the machine's load hits both alike."""
    best = dict.fromkeys(encoders, 0.0)
    for r in range(repeats):
        for name in list(encoders)[:: 1 if r % 2 == 0 else -1]:
            t0 = time.perf_counter()
            for i in range(0, len(features), batch):
                encoders[name].run(features[i : i + batch])
            best[name] = max(best[name], len(features) / (time.perf_counter() - t0))
    return best


def main(argv: list[str] | None = None) -> int:
    """Measures, prints the tables and writes the results file."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--limit", type=int, default=None, help="first N val images (default: all)")
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: the services' default)")
    p.add_argument("--repeats", type=int, default=5, help="alternating passes per precision; the best counts")
    p.add_argument("--speed-items", type=int, default=128, help="items per throughput measurement")
    p.add_argument("--variants", action="store_true", help="also measure the image tower's quantisation recipes")
    p.add_argument("--calibration-images", type=int, default=128, help="--variants: training images calibrating")
    add_results_flag(p, label=True)
    args = p.parse_args(argv)
    report = Report("int8_serving", argv, args.results, label=args.label)
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
            rates = _throughput(encoders, features, batch, args.repeats)
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
    report.line("what --precision auto serves on CPU, from the checks recorded at export:")
    for modality in ("image", "text"):
        choice = choose_precision("auto", modality, bundle.manifest.serving, CPU)
        report.line(f"  {modality:>5}: {choice.precision} ({choice.reason})")
        rows.append({"auto": modality, "precision": choice.precision, "reason": choice.reason})
    if args.variants:
        rows += _variants(report, args, bundle, records, embeddings[("text", "fp32")], owners)
    report.save(rows)
    return 0


def _variants(
    report: Report, args: argparse.Namespace, bundle: Any, records: list[Any], text: np.ndarray, owners: np.ndarray
) -> list[dict[str, Any]]:
    """Each image-tower recipe of `VARIANTS`: val rSum with the text tower at fp32, and int8/fp32 speed."""
    import tempfile

    from trainer.export.int8 import calibration_pixels, quantize_image_static

    cfg = SessionConfig(device="cpu", intra_op_threads=args.threads)
    fp32_path = bundle.file(bundle.manifest.serving.graph("image", "fp32").file)
    preprocess = bundle.manifest.image_preprocess
    train = load_captioned_images(args.data, split="train", limit=args.calibration_images)
    calibration = calibration_pixels([r.path for r in train], preprocess)
    with ImageEncoder.from_session_config(bundle, cfg, "fp32") as encoder:
        pixels = np.stack(encoder.prepare([r.path.read_bytes() for r in records]).good)
    sessions = {"fp32": create_session(fp32_path, cfg)}
    output = bundle.manifest.image.output

    def embed(session: Any) -> np.ndarray:
        return np.concatenate(
            [session.run([output], {"pixel_values": pixels[i : i + 32]})[0] for i in range(0, len(pixels), 32)]
        )

    base = retrieval_metrics(embed(sessions["fp32"]) @ text.T, owners)["rsum"]
    report.line()
    report.line(
        f"image tower quantisation recipes ({len(train)} training images calibrating; val rSum with the text tower at "
        f"fp32, {base:.2f} at fp32):"
    )
    report.line(f"{'recipe':<42} {'rsum':>8} {'d rSum':>7} {'b1 x':>6} {'b32 x':>6}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (parts, method) in VARIANTS.items():
            path = Path(tmp) / f"variant{len(rows)}.onnx"
            quantize_image_static(fp32_path, path, calibration, parts=parts, method=method)
            sessions["int8"] = create_session(path, cfg)
            rsum = retrieval_metrics(embed(sessions["int8"]) @ text.T, owners)["rsum"]
            ratios = {}
            for batch in (1, 32):
                feats = list(pixels[: args.speed_items])
                rates = _throughput({k: _Session(s, output) for k, s in sessions.items()}, feats, batch, args.repeats)
                ratios[batch] = rates["int8"] / rates["fp32"]
            report.line(f"{name:<42} {rsum:>8.2f} {rsum - base:>+7.2f} {ratios[1]:>5.2f}x {ratios[32]:>5.2f}x")
            rows.append(
                {
                    "recipe": name,
                    "float_parts": list(parts),
                    "calibration": method,
                    "rsum": round(rsum, 2),
                    "delta_rsum": round(rsum - base, 2),
                    "ratio_b1": round(ratios[1], 2),
                    "ratio_b32": round(ratios[32], 2),
                }
            )
    return rows


class _Session:
    """A bare image-graph session with the encoder's `run(features)` (for `_throughput`)."""

    def __init__(self, session: Any, output: str) -> None:
        self._session, self._output = session, output

    def run(self, features: list[np.ndarray]) -> np.ndarray:
        return self._session.run([self._output], {"pixel_values": np.stack(features)})[0]


if __name__ == "__main__":
    raise SystemExit(main())
