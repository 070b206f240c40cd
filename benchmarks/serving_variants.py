"""Val R@K / rSum of one trained checkpoint served at several image sides, plain and flip-averaged (no retraining).

    .venv/bin/python -m benchmarks.serving_variants --checkpoint runs/default/checkpoints/best.pt \
        --data ../shared/data/flickr8k [--sizes 224,260,300] [--limit 200] [--results DIR]

The towers are convolutional + pooled, so the same weights run at any side; a side larger than the training crops
often retrieves better ("FixRes", Touvron et al. 2019), and averaging an image's embedding with its mirror image's is
test-time augmentation at about twice the image cost. Each variant is exported exactly as `imgtxt export --image-size N
--flip-average|--no-flip-average` would (parity-gated) into a temporary bundle and measured through ONNX Runtime, as
`imgtxt eval --bundle` does; captions are encoded once (the text graph does not change). Prints a Markdown table whose
last column is each variant's image encode time relative to the first plain variant, measured in this run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.report import Report, add_results_flag
from imgtxt.datasets import load_captioned_images
from imgtxt.encoders.bulk import encode_with_bundle
from imgtxt.retrieval_metrics import retrieval_metrics
from trainer.checkpoint import load_checkpoint
from trainer.export import export_model

METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def main(argv: list[str] | None = None) -> int:
    """Exports and evaluates each (side, flip) variant and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--sizes", default="", help="comma list of image sides (default: the trained side)")
    parser.add_argument("--limit", type=int, default=None, help="first N images of the split")
    parser.add_argument("--batch-size", type=int, default=32)
    add_results_flag(parser)
    args = parser.parse_args(argv)
    report = Report("serving_variants", argv, args.results, markdown=True)
    ckpt = load_checkpoint(args.checkpoint)
    trained = ckpt.model.spec.image_size
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [trained]
    records = load_captioned_images(Path(args.data), args.split, args.limit)
    paths = [r.path for r in records]
    captions = [c for r in records for c in r.captions]
    owners = [i for i, r in enumerate(records) for _ in r.captions]
    rows: list[dict[str, float | int | bool]] = []
    base_s = None
    texts = None
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            for flip in (False, True):
                bundle = Path(tmp) / f"s{size}-f{int(flip)}"
                export_model(
                    ckpt.model, bundle, f"variant-{size}-{flip}", ckpt.config, flip_average=flip, image_size=size
                )
                if texts is None:  # captions are encoded once: the text graph is the same in every variant
                    _, texts, _ = encode_with_bundle(bundle, [], captions, args.batch_size, device="cpu")
                t0 = time.perf_counter()
                images, _, _ = encode_with_bundle(bundle, paths, [], args.batch_size, device="cpu")
                seconds = time.perf_counter() - t0
                base_s = base_s or seconds
                m = retrieval_metrics(images @ texts.T, owners)
                rows.append(
                    {
                        "image_size": size,
                        "flip_average": flip,
                        "encode_x": round(seconds / base_s, 2),
                        **{k: round(v, 2) for k, v in m.items()},
                    }
                )
    report.line(
        f"checkpoint {args.checkpoint} (trained side {trained}, config flip_average={ckpt.model.spec.flip_average});"
        f" {len(paths)} images x {len(captions)} captions"
    )
    report.line("| side | flip average | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rSum | image encode time |")
    report.line("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cells = " | ".join(f"{float(r[k]):.1f}" for k in METRICS)
        report.line(f"| {r['image_size']} | {'yes' if r['flip_average'] else 'no'} | {cells} | {r['encode_x']:.2f}x |")
    report.save(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
