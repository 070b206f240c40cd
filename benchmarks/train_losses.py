"""Flickr8k val R@K / rSum and training wall time of a recipe under each loss option (one run per option).

    .venv/bin/python -m benchmarks.train_losses --recipe quick --data ../shared/data/flickr8k --out /work/runs/losses \
        [--options infonce,vsepp_triplet] [--set epochs=5] [--results DIR]

Every option shares the recipe (and thus the feature cache); only the losses (and, for the hierarchical option, the
local embedding) change. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.report import Report, add_results_flag
from trainer import train

OPTIONS: dict[str, list[str]] = {
    "infonce": ["losses={infonce: 1.0}"],
    "vsepp_triplet": ["losses={vsepp_triplet: 1.0}"],
    "adaptive_margin_triplet": ["losses={adaptive_margin_triplet: 1.0}"],
    "infonce+center": ["losses={infonce: 1.0, center: 0.1}"],
    "soft_negative_triplet": ["losses={soft_negative_triplet: 1.0}"],
    "bcls": ["losses={bcls: 1.0}"],
    "vsepp+relation": ["losses={vsepp_triplet: 1.0, relation: 1.0}"],
    "infonce+quantization": ["losses={infonce: 1.0, quantization: 0.1}"],
    # The hierarchical option adds the local_similarity loss on a 128-d local part of the served vector.
    "infonce+hierarchical": ["losses={infonce: 1.0}", "local_dim=128", "with_unit=false"],
}
"""Option name -> config overrides (over the recipe)."""


def main(argv: list[str] | None = None) -> int:
    """Runs each loss option and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quick", choices=("tiny", "quick", "default"))
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", type=Path, required=True, help="parent directory of the runs")
    parser.add_argument("--options", default=",".join(OPTIONS), help=f"comma list of {', '.join(OPTIONS)}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    add_results_flag(parser)
    args = parser.parse_args(argv)
    report = Report("train_losses", argv, args.results, markdown=True)
    rows = []
    for name in args.options.split(","):
        out = args.out / f"{args.recipe}-{name.replace('+', '_')}"
        argv_run = ["--recipe", args.recipe, "--data", args.data, "--out", str(out)]
        for item in [*OPTIONS[name], *args.overrides]:
            argv_run += ["--set", item]
        t0 = time.perf_counter()
        try:
            train.main(argv_run)
        except Exception as exc:  # one failing option must not hide the others' figures
            rows.append({"option": name, "error": f"{type(exc).__name__}: {exc}"})
            print(f"{name}: FAILED {exc}", file=sys.stderr)
            continue
        wall = time.perf_counter() - t0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        best = max(records, key=lambda r: r["rsum"])
        rows.append({"option": name, "wall_s": round(wall, 1), "best_epoch": best["epoch"], **best})
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
    report.line(f"| {args.recipe} loss | " + " | ".join(keys) + " | best epoch | wall s |")
    report.line("|---" * (len(keys) + 3) + "|")
    for r in rows:
        if "error" in r:
            report.line(f"| {r['option']} | failed: {r['error'][:80]} |")
        else:
            cells = " | ".join(f"{r[k]:.1f}" for k in keys)
            report.line(f"| {r['option']} | {cells} | {r['best_epoch']} | {r['wall_s']} |")
    report.save(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
