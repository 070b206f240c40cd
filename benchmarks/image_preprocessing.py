"""Image decode + resize time per image against the image tower's inference time per image, in one run.

    .venv/bin/python -m benchmarks.image_preprocessing --bundle BUNDLE [--images 256] [--precision fp32]

Decoding and resizing (`imgtxt.preprocess.preprocess_image`, Pillow, which releases the GIL) run in the request
threads and the encoder's preprocessing pool, in parallel with the batcher's session runs; the service is bound by
the model when decode time per image is well below inference time per image. The last line measures it: the
service path (`prepare` in a thread pool overlapping `run`) against inference alone, on the same images.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.report import Report, add_results_flag
from benchmarks.samples import sample_items
from imgtxt.bundle import load_bundle
from imgtxt.encoders.image import ImageEncoder
from imgtxt.encoders.session import SessionConfig, available_cores, default_cache_dir
from imgtxt.preprocess import preprocess_image


def main(argv: list[str] | None = None) -> int:
    """Measures and writes the results file."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--precision", default="fp32", choices=("fp32", "int8"))
    p.add_argument("--batch", type=int, default=32)
    add_results_flag(p)
    args = p.parse_args(argv)
    report = Report("image_preprocessing", argv, args.results)
    items, source = sample_items("image", args.images)
    bundle = load_bundle(args.bundle)
    cfg = SessionConfig(device="cpu", cache_dir=default_cache_dir())
    encoder = ImageEncoder.from_session_config(bundle, cfg, args.precision, preprocess_threads=1)
    config = bundle.manifest.image_preprocess
    images = [i for i in items if isinstance(i, bytes)]
    for data in images[:8]:
        preprocess_image(data, config)  # warm-up
    t0 = time.perf_counter()
    features = [preprocess_image(data, config) for data in images]
    decode_s = (time.perf_counter() - t0) / len(images)
    batches = [features[i : i + args.batch] for i in range(0, len(features), args.batch)]
    encoder.run(batches[0])  # warm-up
    t0 = time.perf_counter()
    for b in batches:
        encoder.run(b)
    infer_s = (time.perf_counter() - t0) / len(features)
    # The service path: decoding in a pool while the previous batch runs, as concurrent requests overlap.
    chunks = [images[i : i + args.batch] for i in range(0, len(images), args.batch)]
    with ThreadPoolExecutor(1) as pool:
        t0 = time.perf_counter()
        pending = pool.submit(encoder.prepare, chunks[0])
        for nxt in [*chunks[1:], None]:
            prepared = pending.result()
            if nxt is not None:
                pending = pool.submit(encoder.prepare, nxt)
            encoder.run(prepared.good)
        overlapped_s = (time.perf_counter() - t0) / len(images)
    encoder.close()
    report.line(f"{source}; {bundle.version} {args.precision}, batch {args.batch}, {available_cores()} cores")
    report.line(f"decode + resize  {decode_s * 1000:7.2f} ms/image (one thread)")
    report.line(f"inference        {infer_s * 1000:7.2f} ms/image (session alone)")
    report.line(f"ratio decode / inference = {decode_s / infer_s:.2f}")
    report.line(
        f"decode overlapped with inference: {overlapped_s * 1000:.2f} ms/image = "
        f"{overlapped_s / infer_s:.2f}x inference alone (1.00x: bound by the model)"
    )
    report.save(
        [
            {
                "decode_ms": round(decode_s * 1000, 3),
                "inference_ms": round(infer_s * 1000, 3),
                "overlapped_ms": round(overlapped_s * 1000, 3),
                "precision": args.precision,
            }
        ]
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
