"""Each seed method against its own baseline: Flickr8k val R@K / rSum and training wall time (one run per option).

    .venv/bin/python -m benchmarks.train_losses --recipe quick --data ../shared/data/flickr8k --out /work/runs/losses \
        [--options infonce,vsepp_triplet] [--set epochs=8] [--results DIR]

Every option shares the recipe (and thus the feature cache); only the losses (and, for the hierarchical option, the
local embedding) change, and each loss gets the batches it declares (`sampling=auto`). Writes two tables: every
option's figures, and every comparison of `COMPARISONS` whose two options ran (method vs its baseline, the direction
its paper claims, and whether it holds here).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from benchmarks.report import Report, add_results_flag
from trainer import train
from trainer.config import TrainConfig


def _earlier_bcls(labels: str = "caption", gap: float = 0.05) -> str:
    """The part kwargs of an earlier-table BCLS option: soft negatives on the text tower's caption labels, the rank
    term on `labels` with label gap `gap` (the defaults before the tested form became `bcls`'s own)."""
    return f"triplet_kwargs: {{labels: caption}}, kendall_kwargs: {{labels: {labels}, min_label_gap: {gap:g}}}"


_EARLIER_BCLS = _earlier_bcls()

OPTIONS: dict[str, list[str]] = {
    "infonce": ["losses={infonce: 1.0}"],
    # BCLS's continuous-label rank term on top of InfoNCE, in InfoNCE's own (image-major) batches.
    "infonce+kendall": ["losses={infonce: 1.0, kendall_rank: 1.0}", "sampling=image"],
    "vsepp_triplet": ["losses={vsepp_triplet: 1.0}"],
    "adaptive_margin_triplet": ["losses={adaptive_margin_triplet: 1.0}"],
    "adaptive_margin+center": ["losses={adaptive_margin_triplet: 1.0, center: 0.1}"],
    "infonce+center": ["losses={infonce: 1.0, center: 0.1}"],
    "soft_negative_triplet": ["losses={soft_negative_triplet: 1.0}"],
    # The BCLS options of the earlier tables, on the frozen text tower's labels at label gap 0.05 (`bcls` alone now
    # means the tested form: lexical labels, gap 0.3; `trainer.losses.soft_negative.BCLS_DEFAULTS`).
    "bcls": ["losses={bcls: 1.0}", f"loss_kwargs={{bcls: {{{_EARLIER_BCLS}}}}}"],
    "bcls_kendall0.1": ["losses={bcls: 1.0}", f"loss_kwargs={{bcls: {{kendall_weight: 0.1, {_EARLIER_BCLS}}}}}"],
    # BCLS's Triplet-SN: the hardest negative still below the positive (semi-hard), no label-based exclusion.
    "triplet_sn": [
        "losses={soft_negative_triplet: 1.0}",
        "loss_kwargs={soft_negative_triplet: {mining: semi_hard, threshold: 1.0}}",
    ],
    # The rank term on image-level labels (each caption against all captions of the image).
    "bcls_image": ["losses={bcls: 1.0}", f"loss_kwargs={{bcls: {{{_earlier_bcls('image')}}}}}"],
    "bcls_image0.1": [
        "losses={bcls: 1.0}",
        f"loss_kwargs={{bcls: {{kendall_weight: 0.1, {_earlier_bcls('image')}}}}}",
    ],
    # Image-level labels, label gaps up to 0.2 treated as ties (fewer, surer pairs), Kendall weight 0.3.
    "bcls_image_gap0.2": [
        "losses={bcls: 1.0}",
        f"loss_kwargs={{bcls: {{kendall_weight: 0.3, {_earlier_bcls('image', 0.2)}}}}}",
    ],
    # The same with lexical labels (content words shared with the image's captions) instead of MiniLM's.
    "bcls_lexical_gap0.2": [
        "losses={bcls: 1.0}",
        f"loss_kwargs={{bcls: {{kendall_weight: 0.3, {_earlier_bcls('lexical', 0.2)}}}}}",
    ],
    "bcls_sn_image0.1": [
        "losses={bcls: 1.0}",
        "loss_kwargs={bcls: {kendall_weight: 0.1, "
        "triplet_kwargs: {mining: semi_hard, threshold: 1.0, labels: caption}, "
        "kendall_kwargs: {labels: image, min_label_gap: 0.05}}}",
    ],
    "vsepp+relation": ["losses={vsepp_triplet: 1.0, relation: 1.0}"],
    "infonce+quantization": ["losses={infonce: 1.0, quantization: 0.1}"],
    # The hierarchical option adds the local_similarity loss on a 128-d local part of the served vector; it cannot
    # carry the unit head, so its baseline is InfoNCE without one (the unit head's small loss is not in either).
    "infonce_global": ["losses={infonce: 1.0}", "with_unit=false"],
    "infonce+hierarchical": ["losses={infonce: 1.0}", "local_dim=128", "with_unit=false"],
}
"""Option name -> config overrides (over the recipe)."""


@dataclass(frozen=True)
class Comparison:
    """A seed method (option) against its own baseline, and the direction its paper claims."""

    method: str
    option: str
    baseline: str
    claim: str


def _against_vsepp(
    method: str, option: str, claim: str = "continuous labels beat the binary-label triplet"
) -> Comparison:
    """A hinge-loss method against the plain VSE++ triplet in the same (caption-major) batches."""
    return Comparison(method, option, "vsepp_triplet", claim)


COMPARISONS = (
    _against_vsepp(
        "HREM (seed 002)", "vsepp+relation", "beats the state of the art in rSum points (no claim over VSE++ stated)"
    ),
    _against_vsepp("BCLS (seed 004)", "bcls"),
    _against_vsepp("BCLS, Kendall weight 0.1", "bcls_kendall0.1"),
    _against_vsepp("BCLS, image-level labels, Kendall weight 0.1", "bcls_image0.1"),
    _against_vsepp("BCLS, image-level labels, label gap 0.2, Kendall weight 0.3", "bcls_image_gap0.2"),
    _against_vsepp("BCLS, lexical image-level labels, label gap 0.2, Kendall weight 0.3", "bcls_lexical_gap0.2"),
    _against_vsepp("Soft negatives alone", "soft_negative_triplet", "not claimed (reported)"),
    _against_vsepp("BCLS's Triplet-SN (semi-hard)", "triplet_sn", "faster convergence than VSE++"),
    Comparison("BCLS rank term on InfoNCE", "infonce+kendall", "infonce", "not claimed (reported)"),
    _against_vsepp(
        "Adaptive margin + center (seed 001)", "adaptive_margin+center", "adaptive margin + center beat a fixed margin"
    ),
    Comparison("Hierarchical (seed 000)", "infonce+hierarchical", "infonce_global", "local + global beats global only"),
)
"""The table of the docs (docs/experiments.md): each seed method with its baseline."""

NOISE = 2.0
"""rSum difference within which a comparison is undecided: one option's val rSum moved 1.7-3.0 between seeds 0 and 1
of the quick recipe (benchmarks/results/train_losses_seed1.md)."""

DEFAULT_OPTIONS = list(dict.fromkeys(name for c in COMPARISONS for name in (c.baseline, c.option)))
"""Options run by default: every option a comparison needs, baselines first."""


def main(argv: list[str] | None = None) -> int:
    """Runs each loss option and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quick", choices=("tiny", "quick", "default"))
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", type=Path, required=True, help="parent directory of the runs")
    parser.add_argument("--options", default=",".join(DEFAULT_OPTIONS), help=f"comma list of {', '.join(OPTIONS)}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    parser.add_argument("--tag", default="", help="results file train_losses_<tag>.md (keeps the main table's file)")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="read back an option whose run directory under --out holds a finished run instead of training it again",
    )
    parser.add_argument(
        "--noise",
        type=float,
        default=NOISE,
        help=f"rSum change that counts as noise in the comparisons (default {NOISE}: seed-to-seed spread)",
    )
    add_results_flag(parser)
    args = parser.parse_args(argv)
    name = f"train_losses_{args.tag}" if args.tag else "train_losses"
    report = Report(name, argv, args.results, markdown=True, module="train_losses")
    rows = []
    for name in args.options.split(","):
        out = args.out / f"{args.recipe}-{name.replace('+', '_')}"
        argv_run = ["--recipe", args.recipe, "--data", args.data, "--out", str(out)]
        for item in [*OPTIONS[name], *args.overrides]:
            argv_run += ["--set", item]
        if args.reuse and finished(out):
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            best = max(records, key=lambda r: r["rsum"])
            rows.append({"option": name, "wall_s": "reused", "best_epoch": best["epoch"], **best})
            continue
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
    _comparisons(report, {r["option"]: r for r in rows if "error" not in r}, args.noise)
    report.save(rows)
    return 0


def finished(out: Path) -> bool:
    """Whether `out` holds a finished run: metrics up to the epochs its saved config asked for."""
    metrics, config = out / "metrics.jsonl", out / "config.yaml"
    if not (metrics.is_file() and config.is_file()):
        return False
    epochs = TrainConfig.from_dict(yaml.safe_load(config.read_text())).optim.epochs
    lines = metrics.read_text().splitlines()
    return bool(lines) and json.loads(lines[-1])["epoch"] >= epochs


def _comparisons(report: Report, done: dict[str, dict], noise: float) -> None:
    """The method-vs-baseline table for every comparison whose two options ran; a change within `noise` rSum of 0
    neither holds nor fails."""
    lines = []
    for c in COMPARISONS:
        if c.option in done and c.baseline in done:
            ours, base = done[c.option]["rsum"], done[c.baseline]["rsum"]
            delta = ours - base
            holds = "yes" if delta > noise else "no" if delta < -noise else f"within noise (±{noise:g})"
            if c.claim.startswith("not claimed"):
                holds = "-"
            lines.append(
                f"| {c.method} | {c.option} | {c.baseline} | {ours:.1f} | {base:.1f} | {delta:+.1f} "
                f"({100 * delta / base:+.1f} %) | {c.claim} | {holds} |"
            )
    if lines:
        report.line("")
        report.line("| method | option | baseline | rSum | baseline rSum | change | paper's claim | holds here |")
        report.line("|---|---|---|---|---|---|---|---|")
        for line in lines:
            report.line(line)


if __name__ == "__main__":
    sys.exit(main())
