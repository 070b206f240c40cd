"""Val R@K / rSum of one trained checkpoint served at several image sides, plain and flip-averaged (no retraining).

    .venv/bin/python -m benchmarks.serving_variants --checkpoint runs/default/checkpoints/best.pt \
        --data ../shared/data/flickr8k [--sizes 224,260,300] [--limit 200] [--json table.json]

The towers are convolutional + pooled, so the same weights run at any side; a side larger than the training crops
often retrieves better ("FixRes", Touvron et al. 2019), and averaging an image's embedding with its mirror image's is
test-time augmentation at about twice the image cost. Each variant is `imgtxt export --image-size N
[--flip-average|--no-flip-average]` of the checkpoint, measured here with the torch towers from pixels (the same
figures as the exported graphs: parity is gated at cosine 0.9999). Captions are encoded once. Prints a Markdown
table; the encode-time column is relative to the first plain variant, measured in this run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from imgtxt.datasets import load_captioned_images
from imgtxt.metrics import retrieval_metrics
from trainer.checkpoint import load_checkpoint
from trainer.data import CaptionTable, PixelSource
from trainer.encode import encode_images, encode_split


def main(argv: list[str] | None = None) -> int:
    """Evaluates each (side, flip) variant and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--sizes", default="", help="comma list of image sides (default: the trained side)")
    parser.add_argument("--limit", type=int, default=None, help="first N images of the split")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    model = ckpt.model
    trained = model.spec.image_size
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [trained]
    table = CaptionTable.from_images(load_captioned_images(Path(args.data), args.split, args.limit))
    device = torch.device("cpu")
    _, texts = encode_split(model, PixelSource(model, table, 0, 1), table, 0, 1, args.batch_size, device)
    rows: list[dict[str, float | int | bool]] = []
    base_s = None
    for size in sizes:
        source = PixelSource(
            model, table, 0, 1, preprocess=dataclasses.replace(model.image_preprocess, image_size=size)
        )
        for flip in (False, True):
            t0 = time.perf_counter()
            images = encode_images(model, source, len(table.images), 0, args.batch_size, device, flip_average=flip)
            seconds = time.perf_counter() - t0
            base_s = base_s or seconds
            m = retrieval_metrics(images @ texts.T, table.caption_image)
            rows.append({"image_size": size, "flip_average": flip, "encode_x": round(seconds / base_s, 2),
                         **{k: round(v, 2) for k, v in m.items()}})  # fmt: skip
    print(f"checkpoint {args.checkpoint} (trained side {trained}, config flip_average={model.spec.flip_average}); "
          f"{len(table.images)} images x {len(table.captions)} captions")  # fmt: skip
    print("| side | flip average | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rSum | image encode time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cells = [r[k] for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")]
        print(f"| {r['image_size']} | {'yes' if r['flip_average'] else 'no'} | "
              + " | ".join(f"{c:.1f}" for c in cells) + f" | {r['encode_x']:.2f}x |")  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
