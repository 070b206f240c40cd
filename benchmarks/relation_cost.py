"""Training-step cost of HREM's relation forms (similarity / fragment connections / learned relevance), in one run.

    .venv/bin/python -m benchmarks.relation_cost [--batch 128] [--tokens 32] [--repeats 5]

One step of the trainable part of a heads-only run at the quick recipe's shapes (EfficientNet-Lite0 7 x 7 x 1280
cells and MiniLM 384-wide tokens in, D = 512, batch 128 captions): both heads forward (plus the projected fragments
when the form needs them), VSE++ + relation loss, backward. The forms run interleaved, so a change in the
machine's load hits them alike; the last column is each form's median step time over the similarity form's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch import nn

from benchmarks.report import Report, add_results_flag
from trainer.losses import CombinedLoss, LossInputs
from trainer.model import ImageTower, TextTower

FORMS: dict[str, dict[str, Any]] = {
    "similarity": {},
    "fragment": {"connections": "fragment"},
    "learned": {"connections": "fragment", "relevance": "learned", "relevance_weight": 1.0},
}
"""Form name -> relation loss kwargs (the arms vsepp+relation, vsepp+relation_fragment, vsepp+relation_learned)."""


def _step(image: ImageTower, text: TextTower, loss: CombinedLoss, inputs: dict[str, torch.Tensor]) -> float:
    """Seconds of one forward + backward."""
    fragments = bool(loss.requires)
    t0 = time.perf_counter()
    img = image.encode_parts(inputs["cells"], 0, fragments=fragments)
    txt = text.encode_parts(inputs["tokens"], inputs["mask"], 1, fragments=fragments)
    batch = LossInputs(
        img.glob,
        txt.glob,
        inputs["ids"],
        epoch=1,
        image_fragments=img.fragments,
        text_fragments=txt.fragments,
        text_fragment_mask=txt.fragment_mask,
    )
    loss(batch)["loss"].backward()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """Measures and writes the results file."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128, help="captions per step (each of its own image)")
    p.add_argument("--tokens", type=int, default=32, help="the batch's longest caption, in tokens")
    p.add_argument("--grid", type=int, default=7, help="side of the image grid of cells")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per form (after one warm-up step)")
    add_results_flag(p)
    args = p.parse_args(argv)
    report = Report("relation_cost", argv, args.results, markdown=True)
    torch.manual_seed(0)
    image = ImageTower([], 1280, 512)
    text = TextTower(nn.Identity(), [], 384, 512)
    lengths = torch.randint(max(2, args.tokens // 3), args.tokens + 1, (args.batch,))
    lengths[0] = args.tokens
    inputs = {
        "cells": torch.randn(args.batch, 1280, args.grid, args.grid),
        "tokens": torch.randn(args.batch, args.tokens, 384),
        "mask": (torch.arange(args.tokens)[None, :] < lengths[:, None]).long(),
        "ids": torch.arange(args.batch),
    }
    losses = {
        name: CombinedLoss({"vsepp_triplet": 1.0, "relation": 1.0}, {"relation": {"dim": 512, **kwargs}})
        for name, kwargs in FORMS.items()
    }
    times: dict[str, list[float]] = {name: [] for name in FORMS}
    for loss in losses.values():
        _step(image, text, loss, inputs)  # warm-up
    for _ in range(args.repeats):
        for name, loss in losses.items():
            times[name].append(_step(image, text, loss, inputs))
    base = statistics.median(times["similarity"])
    report.line(
        f"Batch {args.batch} captions, {args.grid} x {args.grid} cells, {args.tokens} tokens, D = 512; "
        f"{torch.get_num_threads()} threads; median of {args.repeats} steps."
    )
    report.line("")
    report.line("| relation form | step (ms) | x similarity |")
    report.line("|---|---|---|")
    rows = []
    for name in FORMS:
        median = statistics.median(times[name])
        report.line(f"| {name} | {1000 * median:.0f} | {median / base:.2f} |")
        rows.append({"form": name, "median_s": median, "ratio": median / base, "steps_s": times[name]})
    report.save(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
