"""How much local (lexical) similarity the hierarchical option's batches hold: random image batches against lexical
neighbour batches (`data.lexical_neighbours`), on the training split.

    .venv/bin/python -m benchmarks.lexical_batches --data ../shared/data/flickr8k [--batch-size 128] \
        [--group-sizes 2,4,8] [--seed 0]

For each sampler, the figures of `trainer.data.lexical.local_label_share` over one epoch's batches (image-major,
every caption of each image, as the trainer builds them): the share of other-image caption pairs with a lexical label
above 0 and at 0.3 or more, the mean label, the share of captions whose batch holds another image's caption at 0.3 or
more (what the local hinge's hardest negative can be), and the mean of each caption's highest such label; the ratio
of the last two to random batches' is printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from benchmarks.report import Report, add_results_flag
from imgtxt.datasets import load_captioned_images
from trainer.data import CaptionTable
from trainer.data.lexical import LABEL_SHARE_KEYS, LexicalNeighbours, local_label_share


def main(argv: list[str] | None = None) -> int:
    """Measures the samplers' batches and writes `benchmarks/results/lexical_batches.md`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch (the quick recipe's)")
    parser.add_argument("--group-sizes", default="2,4,8", help="comma list of lexical group sizes")
    parser.add_argument("--seed", type=int, default=0)
    add_results_flag(parser)
    args = parser.parse_args(argv)
    table = CaptionTable.from_images(load_captioned_images(Path(args.data), args.split, None))
    n = len(table.images)
    steps = max(1, n // args.batch_size)
    samplers = {"random": np.array_split(np.random.default_rng(args.seed).permutation(n), steps)}
    for size in (int(g) for g in args.group_sizes.split(",")):
        samplers[f"lexical_neighbours={size}"] = LexicalNeighbours(table, size).batches(steps, args.seed)
    report = Report("lexical_batches", argv, args.results, markdown=True)
    split = f"{n} images of split {args.split!r}"
    report.line(
        f"{split}, {steps} batches of about {args.batch_size} images (each with all its captions), seed {args.seed}."
    )
    report.line("")
    report.line(f"| sampler | {' | '.join(LABEL_SHARE_KEYS)} | ratio to random (close negative, nearest label) |")
    report.line("|---" * (len(LABEL_SHARE_KEYS) + 2) + "|")
    rows = []
    base: dict[str, float] = {}
    for name, batches in samplers.items():
        got = local_label_share(table, batches)
        base = base or got
        ratio = (
            f"{got['anchors_with_close_negative'] / base['anchors_with_close_negative']:.2f}, "
            f"{got['mean_nearest_label'] / base['mean_nearest_label']:.2f}"
        )
        report.line(f"| {name} | {' | '.join(f'{got[k]:.4f}' for k in LABEL_SHARE_KEYS)} | {ratio} |")
        rows.append({"sampler": name, **got})
    report.save(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
