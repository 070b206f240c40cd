"""The seed methods tested like science: each paper's arms over paired seeds, the epoch chosen on a dev split.

    .venv/bin/python -m benchmarks.seed_methods --recipe quick --data ../shared/data/flickr8k --out /work/runs/seeds \
        [--papers hrem,bcls] [--arms vsepp,vsepp+relation] [--seeds 0,1,2,3] [--reuse] [--report-only] [--tag T]

Every arm is one config over the recipe (`ARMS`); every run of an arm at seed s shares its batch order and head
initialisation with every other arm's run at seed s (the trainer seeds both from `seed`), so arms are compared seed
by seed: the paired difference. Each run holds out `--dev-images` training images (`data.dev_images`, never trained
on) and the epoch is the one with the best dev rSum; the table reports validation at that epoch and at the last one.
For each paper (`PAPERS`) the results file lists the claim as the paper states it, every arm's figure at every seed,
the mean paired difference against the tuned baseline with its 95 % Student-t interval, graded measures (mAP@R,
R-Precision, per-query Kendall τb against lexical labels, `evaluation.graded`) and the verdict of `verdict`.
`--reuse` reads back finished runs; `--report-only` trains nothing and writes the table of what has finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy import sparse, stats

from benchmarks.report import Report, add_results_flag
from benchmarks.train_losses import OPTIONS, finished
from evaluation.graded import graded_metrics, unit_recall
from imgtxt.retrieval_metrics import retrieval_metrics
from trainer import train
from trainer.losses.hierarchical import STOP_WORDS, content_words

logger = logging.getLogger(__name__)

ARMS: dict[str, list[str]] = {
    "vsepp": OPTIONS["vsepp_triplet"],
    "vsepp_m0.1": [*OPTIONS["vsepp_triplet"], "loss_kwargs={vsepp_triplet: {margin: 0.1}}"],
    "vsepp_m0.3": [*OPTIONS["vsepp_triplet"], "loss_kwargs={vsepp_triplet: {margin: 0.3}}"],
    # HREM: base hinge + the three relation hinges summed (3 : 1), similarity connections.
    "vsepp+relation": OPTIONS["vsepp+relation"],
    # The control: the same module and hinges, every instance attending only to itself.
    "vsepp+relation_self": [*OPTIONS["vsepp+relation"], "loss_kwargs={relation: {connections: self}}"],
    # HREM's relevance relation as a bias on the attention logits (mask_weight 1, distance form).
    "vsepp+relation_relevance": [*OPTIONS["vsepp+relation"], "loss_kwargs={relation: {relevance_weight: 1.0}}"],
    # HREM's neighbour batches (k-means clusters of images, from epoch 2; image-major batches).
    "vsepp+relation_neighbours": [*OPTIONS["vsepp+relation"], "neighbour_batches_from=2"],
    # Its twin in the same image-major batches (128 images with all their captions: a fifth of the steps of the
    # caption-major arms) without the neighbour clusters, which separates the clusters from the batch shape.
    "vsepp+relation_imagebatch": [*OPTIONS["vsepp+relation"], "sampling=image"],
    # HREM's inter-modal connections: fragment-level matching of grid cells and tokens instead of the global cosine.
    "vsepp+relation_fragment": [*OPTIONS["vsepp+relation"], "loss_kwargs={relation: {connections: fragment}}"],
    # HREM's relations in full: fragment connections plus its learned relevance on the attention logits (mask_weight
    # 1), regularised towards the distance form (reg_loss_weight 10).
    "vsepp+relation_learned": [
        *OPTIONS["vsepp+relation"],
        "loss_kwargs={relation: {connections: fragment, relevance: learned, relevance_weight: 1.0}}",
    ],
    # The earlier tables' form: the three relation hinges averaged (1 : 1).
    "vsepp+relation_mean": [*OPTIONS["vsepp+relation"], "loss_kwargs={relation: {aggregate: mean}}"],
    # BCLS as its authors' code weights it (label gap 0.3, rank weight 1), on labels independent of the text tower:
    # lexical image-level ones for the rank term (mean over the image's captions) and the soft negatives (maximum).
    "bcls_lexical_gap0.3": [
        "losses={bcls: 1.0}",
        "loss_kwargs={bcls: {kendall_weight: 1.0, triplet_kwargs: {labels: lexical_max}, "
        "kendall_kwargs: {labels: lexical, min_label_gap: 0.3}}}",
    ],
    "triplet_sn": OPTIONS["triplet_sn"],
    "adaptive_margin": OPTIONS["adaptive_margin_triplet"],
    "adaptive_margin+center": OPTIONS["adaptive_margin+center"],
    # The centre loss on learned concept centres instead of the batch's per-image means.
    "adaptive_margin+concept_center": ["losses={adaptive_margin_triplet: 1.0, concept_center: 0.1}"],
    # VSE++ with distance-weighted sampling (HREM's mining option) instead of the hardest negative.
    "vsepp_dws": [*OPTIONS["vsepp_triplet"], "loss_kwargs={vsepp_triplet: {mining: distance_weighted}}"],
    "vsepp_m0.12": [*OPTIONS["vsepp_triplet"], "loss_kwargs={vsepp_triplet: {margin: 0.12}}"],
    "vsepp_m0.16": [*OPTIONS["vsepp_triplet"], "loss_kwargs={vsepp_triplet: {margin: 0.16}}"],
    "infonce_global": OPTIONS["infonce_global"],
    # The hierarchical paper's baseline tuned like the method's: InfoNCE's initial temperature over three values
    # (it is learned from there, so the start is what a budget can tune).
    "infonce_global_t0.05": [*OPTIONS["infonce_global"], "loss_kwargs={infonce: {init_temperature: 0.05}}"],
    "infonce_global_t0.1": [*OPTIONS["infonce_global"], "loss_kwargs={infonce: {init_temperature: 0.1}}"],
    "infonce+hierarchical": OPTIONS["infonce+hierarchical"],
    # The method at the initial temperature that tunes its baseline best (the temperature barely learns in a few
    # hundred steps, so the comparison with the tuned baseline needs the method's twin at the same start).
    "infonce+hierarchical_t0.05": [*OPTIONS["infonce+hierarchical"], "loss_kwargs={infonce: {init_temperature: 0.05}}"],
    # The recipes' own loss (InfoNCE, unit head included) at three initial temperatures, and BCLS on top of it: the
    # rank term as `bcls_lexical_gap0.3` weights it (lexical image-level labels, gap 0.3, weight 1) in InfoNCE's own
    # image-major batches. BCLS's other half, the soft-negative triplet, is the hinge InfoNCE replaces.
    "infonce": OPTIONS["infonce"],
    "infonce_t0.05": [*OPTIONS["infonce"], "loss_kwargs={infonce: {init_temperature: 0.05}}"],
    "infonce_t0.1": [*OPTIONS["infonce"], "loss_kwargs={infonce: {init_temperature: 0.1}}"],
    "infonce+bcls_rank": [
        "losses={infonce: 1.0, kendall_rank: 1.0}",
        "sampling=image",
        "loss_kwargs={kendall_rank: {labels: lexical, min_label_gap: 0.3}}",
    ],
    "infonce_t0.05+bcls_rank": [
        "losses={infonce: 1.0, kendall_rank: 1.0}",
        "sampling=image",
        "loss_kwargs={infonce: {init_temperature: 0.05}, kendall_rank: {labels: lexical, min_label_gap: 0.3}}",
    ],
    # The adaptive margin refined during training (its similarity moves to the learned embedding's calibrated
    # caption cosines over 4 epochs, up to half), with the learned concept centres.
    "adaptive_margin_refined+concept_center": [
        "losses={adaptive_margin_triplet: 1.0, concept_center: 0.1}",
        "loss_kwargs={adaptive_margin_triplet: {refine_share: 0.5, refine_epochs: 4}}",
    ],
    # The same at a tenth of the centre weight (0.01): the method's own budget, as the baseline's margins are tuned.
    "adaptive_margin_refined+concept_center0.01": [
        "losses={adaptive_margin_triplet: 1.0, concept_center: 0.01}",
        "loss_kwargs={adaptive_margin_triplet: {refine_share: 0.5, refine_epochs: 4}}",
    ],
    # The hierarchical option in lexical neighbour batches (each image with 3 others sharing content words), and
    # without its local hinge (the local regression alone).
    "infonce+hierarchical_lexbatch": [*OPTIONS["infonce+hierarchical"], "lexical_neighbours=4"],
    "infonce+hierarchical_nohinge": [
        *OPTIONS["infonce+hierarchical"],
        "loss_kwargs={local_similarity: {hinge_weight: 0.0}}",
    ],
}
"""Arm name -> config overrides over the recipe."""


@dataclass(frozen=True)
class Paper:
    """One seed method's test: its claim as the paper states it, the arm, the baselines and controls."""

    key: str
    name: str
    claim: str
    """The claim, stated as the paper states it."""
    method: str
    baselines: tuple[str, ...]
    """Candidate baselines; the one with the best mean dev rSum over the seeds is the tuned baseline."""
    controls: tuple[str, ...] = ()
    """Further arms compared with the method the same way (e.g. a control without the mechanism)."""
    pairs: tuple[tuple[str, str], ...] = ()
    """Further (arm, other) comparisons among the arms, e.g. a form against its twin without the change."""
    claimed_points: float | None = None
    """The rSum gain (points) the paper claims in a setting comparable to this one; None: the paper states none
    that a Flickr8k run could be held to, so a positive interval can only confirm the direction."""
    label_note: str = ""
    """How the graded measures' label source relates to the method's training labels."""


PAPERS = (
    Paper(
        "hrem",
        "HREM (seed 002)",
        "Fu et al. 2023 (CVPR): hierarchical relation modelling outperforms the state of the art on Flickr30K and "
        "MS-COCO in rSum points; the paper states no gain over VSE++ on Flickr8k",
        "vsepp+relation",
        ("vsepp", "vsepp_m0.1", "vsepp_m0.3"),
        controls=(
            "vsepp+relation_self",
            "vsepp+relation_relevance",
            "vsepp+relation_neighbours",
            "vsepp+relation_imagebatch",
            "vsepp+relation_fragment",
            "vsepp+relation_learned",
            "vsepp_dws",
        ),
        # Each form against the summed-hinge relation arm it changes one thing of.
        pairs=(
            ("vsepp+relation_relevance", "vsepp+relation"),
            ("vsepp+relation_neighbours", "vsepp+relation_imagebatch"),
            ("vsepp+relation_imagebatch", "vsepp+relation"),
            ("vsepp+relation_fragment", "vsepp+relation"),
            ("vsepp+relation_learned", "vsepp+relation_fragment"),
            # The paper's relations in full against the module with no relation between instances.
            ("vsepp+relation_fragment", "vsepp+relation_self"),
            ("vsepp+relation_learned", "vsepp+relation_self"),
        ),
    ),
    Paper(
        "bcls",
        "BCLS (seed 004)",
        "continuous-label learning beats the binary-label triplet on graded relevance (and R@K)",
        "bcls_lexical_gap0.3",
        ("vsepp", "vsepp_m0.1", "vsepp_m0.3"),
        controls=("triplet_sn",),
        label_note="the method trains on lexical labels, so its graded figures are not independent of them",
    ),
    Paper(
        "margin",
        "Adaptive margin + center (seed 001)",
        "Malali & Keller (TPAMI 2022): a semantically adaptive margin, refined during training, with a center loss, "
        "beats a fixed margin; the paper states no size for Flickr8k heads-only training",
        # The paper's form: the refined margin with learned concept centres. The per-batch centre of the earlier
        # tables (`adaptive_margin+center`) reduces to an alignment term and is not in the comparison.
        "adaptive_margin_refined+concept_center",
        ("vsepp_m0.12", "vsepp_m0.16", "vsepp"),
        controls=("adaptive_margin", "adaptive_margin+concept_center", "adaptive_margin_refined+concept_center0.01"),
        pairs=(
            ("adaptive_margin+concept_center", "adaptive_margin"),
            ("adaptive_margin_refined+concept_center0.01", "adaptive_margin"),
        ),
    ),
    Paper(
        "hierarchical",
        "Hierarchical (seed 000)",
        "local + global embedding beats global only",
        "infonce+hierarchical",
        ("infonce_global", "infonce_global_t0.05", "infonce_global_t0.1"),
        controls=("infonce+hierarchical_t0.05", "infonce+hierarchical_lexbatch", "infonce+hierarchical_nohinge"),
        # Each form against its twin at the same initial temperature.
        pairs=(
            ("infonce+hierarchical", "infonce_global"),
            ("infonce+hierarchical_t0.05", "infonce_global_t0.05"),
        ),
        label_note="the local part trains on lexical caption-caption labels",
    ),
    Paper(
        "product",
        "BCLS on the recipes' loss (what holds goes into the product)",
        "BCLS's interval lies above the tuned VSE++ (the section above); the recipes train InfoNCE, so the question "
        "for the product is whether BCLS's rank term helps on top of InfoNCE, and whether BCLS alone replaces it",
        "infonce+bcls_rank",
        ("infonce", "infonce_t0.05", "infonce_t0.1"),
        controls=("infonce_t0.05+bcls_rank", "bcls_lexical_gap0.3"),
        # The rank term against its twin at each initial temperature.
        pairs=(("infonce_t0.05+bcls_rank", "infonce_t0.05"), ("infonce+bcls_rank", "infonce")),
        label_note="the BCLS arms train on lexical labels, so their graded figures are not independent of them",
    ),
)
"""The papers of the table; the unit-retrieval paper (seed 003) has no arm here yet (see docs/experiments.md)."""

GRADED_THRESHOLD = 0.3
"""Relevant for mAP@R / R-Precision: an image's own captions, and any caption whose lexical label (mean content-word
Jaccard with the image's other captions) is at least this."""

GRADED_KEYS = ("i2t_map_r", "t2i_map_r", "i2t_r_precision", "t2i_r_precision", "i2t_tau_b", "t2i_tau_b")


def paired_interval(differences: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean paired difference and its Student-t interval (NaN bounds with one pair)."""
    d = np.asarray(differences, dtype=np.float64)
    mean = float(d.mean())
    if len(d) < 2:
        return mean, math.nan, math.nan
    if np.ptp(d) == 0:  # identical differences: no spread, the interval is the point
        return mean, mean, mean
    low, high = stats.t.interval(confidence, len(d) - 1, loc=mean, scale=stats.sem(d))
    return mean, float(low), float(high)


def verdict(mean: float, low: float, high: float, claimed_points: float | None) -> str:
    """The issue's rule: "holds" only when the interval is above 0 and the size is the paper's claim; "does not
    hold" when it is below 0; otherwise "not established". An interval above 0 without a comparable claimed size
    confirms the direction only, and says so."""
    if math.isnan(low):
        return "not established (fewer than 2 seeds)"
    if high < 0:
        return "does not hold"
    if low <= 0:
        return "not established"
    if claimed_points is None:
        return "direction holds (the paper claims no size comparable to this setting)"
    if mean >= claimed_points:
        return "holds"
    return f"above 0, below the claimed {claimed_points:g} points"


MEAN_MARGIN = "adaptive_mean_margin"
"""The adaptive margin's logged term (weight 0): its mean in-batch margin over the epoch."""


def run_figures(out: Path) -> dict[str, Any]:
    """A finished run's figures: the epoch with the best dev rSum (the first of a tie), validation there and at
    the last epoch."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    chosen = max(records, key=lambda r: r.get("dev_rsum", r["rsum"]))
    last = records[-1]
    return {
        "epoch": chosen["epoch"],
        "epochs": last["epoch"],
        "rsum": chosen["rsum"],
        "dev_rsum": chosen.get("dev_rsum", math.nan),
        "last_rsum": last["rsum"],
        **{k: chosen[k] for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")},
        # The adaptive margin's logged mean in-batch margin, for the margin-matched ablation.
        **({MEAN_MARGIN: chosen[f"train_{MEAN_MARGIN}"]} if f"train_{MEAN_MARGIN}" in chosen else {}),
    }


def lexical_labels(captions: list[str], caption_image: np.ndarray) -> np.ndarray:
    """(n_images, n_captions) lexical relevance labels: caption j's mean content-word Jaccard with the captions of
    image i, leaving j itself out when it is one of them (so an own caption is not scored against itself)."""
    words = [content_words(c) for c in captions]
    vocab = {w: k for k, w in enumerate(sorted(set().union(*words)))}
    rows = [k for k, ws in enumerate(words) for _ in ws]
    cols = [vocab[w] for ws in words for w in ws]
    a = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(words), len(vocab)))
    inter = (a @ a.T).toarray()
    size = np.asarray(a.sum(1)).ravel()
    union = size[:, None] + size[None, :] - inter
    jaccard = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    np.fill_diagonal(jaccard, 0.0)
    n_images = int(caption_image.max()) + 1
    owner = sparse.csr_matrix(
        (np.ones(len(captions), np.float32), (caption_image, np.arange(len(captions)))), shape=(n_images, len(captions))
    )
    total = np.asarray(owner @ jaccard)
    counts = np.bincount(caption_image, minlength=n_images).astype(np.float32)[:, None] - owner.toarray()
    return (total / np.maximum(counts, 1)).astype(np.float32)


MIX_WEIGHTS = (0.0, 0.2, 0.5)
"""The hierarchical option's local share w swept after training (`ModelSpec.local_weight`)."""


def mix_sweep(
    image: np.ndarray, text: np.ndarray, dim: int, trained_weight: float, weights: tuple[float, ...] = MIX_WEIGHTS
) -> dict[float, np.ndarray]:
    """Similarity matrices of a hierarchical model's served vectors re-mixed at other local shares w.

    The served vector is `[sqrt(1 - w0) global, sqrt(w0) local]` (w0: `trained_weight`, strictly between 0 and 1),
    so each part is recovered exactly and `(1 - w) cos_global + w cos_local` rebuilt for every w of `weights`.
    """
    if not 0.0 < trained_weight < 1.0:
        raise ValueError(f"the parts can only be recovered for a trained local_weight in (0, 1), not {trained_weight}")
    a, b = math.sqrt(1.0 - trained_weight), math.sqrt(trained_weight)
    glob = (image[:, :dim] / a) @ (text[:, :dim] / a).T
    local = (image[:, dim:] / b) @ (text[:, dim:] / b).T
    return {w: (1.0 - w) * glob + w * local for w in weights}


def keyword_query(caption: str) -> str:
    """A caption as a keyword-style query: its content words in order (stop words and single letters dropped)."""
    return " ".join(w for w in re.findall(r"[a-z]+", caption.lower()) if len(w) > 1 and w not in STOP_WORDS)


UNIT_FUSIONS = ("trained", "sum", "image")
"""Retrieval units scored: the trained fusion head, normalize(v + t), and the bare image (plain caption -> image)."""


def unit_figures(checkpoint: Path, table: Any, image: np.ndarray, text: np.ndarray) -> dict[str, float]:
    """Leave-one-caption-out unit retrieval (`evaluation.graded.unit_recall`) of a checkpoint with a unit head, for
    full-caption and keyword queries against each of `UNIT_FUSIONS`: `unit_{caption|keywords}_{fusion}_{r1,rsum}`.

    Each image's gallery unit fuses it with its first caption; a query that is that caption meets the image fused
    with its second caption instead.
    """
    import torch
    import torch.nn.functional as F

    from trainer.checkpoint import load_checkpoint
    from trainer.data.inputs import tokenize

    model = load_checkpoint(checkpoint).model
    if model.unit is None:
        return {}
    starts, ends = table.caption_spans(np.arange(len(table.images)))
    if ((ends - starts) < 2).any():
        raise ValueError("leave-one-caption-out unit retrieval needs at least two captions per image")
    v, t = torch.from_numpy(image), torch.from_numpy(text)
    with torch.no_grad():
        keywords = [keyword_query(c) for c in table.captions]
        chunks = []
        for start in range(0, len(keywords), 256):
            ids, mask = tokenize(model, keywords[start : start + 256])
            chunks.append(model.text(ids, mask).float())
        queries = {"caption": text, "keywords": torch.cat(chunks).numpy()}
        units = {
            "trained": (model.unit(v, t[starts]).numpy(), model.unit(v, t[starts + 1]).numpy()),
            "sum": (F.normalize(v + t[starts], dim=-1).numpy(), F.normalize(v + t[starts + 1], dim=-1).numpy()),
            "image": (image, image),
        }
    owner = table.caption_image
    in_unit = np.arange(len(table.captions)) == starts[owner]
    out = {}
    for kind, q in queries.items():
        for fusion, (gallery, spare) in units.items():
            got = unit_recall(q, gallery, spare, owner, in_unit)
            out[f"unit_{kind}_{fusion}_r1"], out[f"unit_{kind}_{fusion}_rsum"] = got["r1"], got["rsum"]
    return out


class Graded:
    """The graded measures of a run's dev-selected checkpoint on validation, cached in the run directory."""

    def __init__(self, data: str, cache_dir: Path | None) -> None:
        self.data, self.cache_dir = data, cache_dir
        self._labels: tuple[Any, np.ndarray, np.ndarray] | None = None

    def _table(self) -> tuple[Any, np.ndarray, np.ndarray]:
        if self._labels is None:
            from imgtxt.datasets import load_captioned_images
            from trainer.data import CaptionTable

            table = CaptionTable.from_images(load_captioned_images(Path(self.data), "val", None))
            labels = lexical_labels(table.captions, table.caption_image)
            own = table.caption_image[None, :] == np.arange(len(table.images))[:, None]
            self._labels = (table, labels, own | (labels >= GRADED_THRESHOLD))
        return self._labels

    def __call__(self, out: Path) -> dict[str, float]:
        path, units_path = out / "graded.json", out / "units.json"
        if path.is_file() and units_path.is_file():
            return {**json.loads(path.read_text()), **json.loads(units_path.read_text())}
        from trainer.data import default_cache_dir
        from trainer.encode import encode_checkpoint_cached

        table, labels, relevant = self._table()
        cache = self.cache_dir or default_cache_dir()
        img, txt = encode_checkpoint_cached(out / "checkpoints" / "best.pt", table, cache)
        if not units_path.is_file():
            units_path.write_text(json.dumps(unit_figures(out / "checkpoints" / "best.pt", table, img, txt)))
        units = json.loads(units_path.read_text())
        if path.is_file():
            return {**json.loads(path.read_text()), **units}
        figures = graded_metrics(img @ txt.T, labels, relevant)
        model = yaml.safe_load((out / "config.yaml").read_text())["model"]
        if model["local_dim"]:  # the hierarchical option: its local share swept after training
            mixes = mix_sweep(img, txt, model["dim"], model.get("local_weight", 0.2))
            for w, sim in mixes.items():
                figures[f"mix_w{w:g}_rsum"] = retrieval_metrics(sim, table.caption_image)["rsum"]
        path.write_text(json.dumps(figures))
        return {**figures, **units}


def main(argv: list[str] | None = None) -> int:
    """Runs the arms over the seeds (or reads them back) and writes the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quick", choices=("tiny", "quick", "default"))
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", type=Path, required=True, help="parent directory of the runs")
    parser.add_argument("--papers", default=",".join(p.key for p in PAPERS), help="comma list of paper keys")
    parser.add_argument("--arms", default="", help="comma list of arms to train, in this order (default: the papers')")
    parser.add_argument("--seeds", default="0,1,2,3", help="comma list of seeds (>= 4 for a verdict by the rule)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--dev-images", type=int, default=500, help="training images held out to choose the epoch")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    parser.add_argument("--tag", default="", help="results file seed_methods_<tag>.md")
    parser.add_argument("--reuse", action="store_true", help="read back finished runs instead of training them")
    parser.add_argument("--report-only", action="store_true", help="train nothing; tabulate the finished runs")
    parser.add_argument("--no-graded", action="store_true", help="skip the graded measures")
    add_results_flag(parser)
    args = parser.parse_args(argv)
    papers = [p for p in PAPERS if p.key in args.papers.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = (
        args.arms.split(",")
        if args.arms
        else list(dict.fromkeys(a for p in papers for a in (*p.baselines, p.method, *p.controls)))
    )
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; valid: {', '.join(ARMS)}")
    cache_dir = next((Path(o.split("=", 1)[1]) for o in args.overrides if o.startswith("cache_dir=")), None)
    graded = None if args.no_graded else Graded(args.data, cache_dir)
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    for seed in seeds:
        for arm in arms:
            out = args.out / f"{args.recipe}-{arm.replace('+', '_')}-s{seed}"
            if not ((args.reuse or args.report_only) and finished(out)):
                if args.report_only:
                    continue
                if not _claim(out):
                    logger.info("%s seed %d is being trained by another process: skipped", arm, seed)
                    continue
                argv_run = ["--recipe", args.recipe, "--data", args.data, "--out", str(out)]
                if (out / "checkpoints" / "last.pt").is_file():  # an interrupted run continues where it stopped
                    argv_run.append("--resume")
                sets = [f"seed={seed}", f"epochs={args.epochs}", f"dev_images={args.dev_images}"]
                for item in [*ARMS[arm], *sets, *args.overrides]:
                    argv_run += ["--set", item]
                t0 = time.perf_counter()
                try:
                    train.main(argv_run)
                except Exception as exc:  # one failing run must not hide the others' figures
                    logger.error("%s seed %d failed: %s", arm, seed, exc)
                    continue
                finally:
                    (out / CLAIM).unlink(missing_ok=True)
                logger.info("%s seed %d: %.0f s", arm, seed, time.perf_counter() - t0)
            runs[(arm, seed)] = {"arm": arm, "seed": seed, **run_figures(out)}
            if graded is not None:
                runs[(arm, seed)].update(graded(out))
    name = f"seed_methods_{args.tag}" if args.tag else "seed_methods"
    report = Report(name, argv, args.results, markdown=True, module="seed_methods")
    summaries = [_paper(report, p, runs, seeds) for p in papers]
    summaries.append(_units(report, runs, seeds, arms))
    report.save(json_safe({"runs": list(runs.values()), "papers": [s for s in summaries if s]}))
    return 0


def json_safe(value: Any) -> Any:
    """`value` with every NaN float (an interval of one pair, a dev figure of a run without dev split) as None, so
    the results file is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


UNITS_CLAIM = (
    "retrieval units, an image fused with a caption and indexed as one vector, answer caption queries better than "
    "the image alone (this project's summary of the seed 003 paper)"
)


def _units(
    report: Report, runs: dict[tuple[str, int], dict[str, Any]], seeds: list[int], arms: list[str]
) -> dict[str, Any] | None:
    """The units section: leave-one-caption-out unit retrieval of the first arm whose runs have a unit head, each
    fusion against the bare image and the trained fusion against normalize(v + t), paired over the seeds."""
    key = "unit_caption_trained_rsum"
    arm = next((a for a in arms if any(key in runs.get((a, s), {}) for s in seeds)), None)
    if arm is None:
        return None
    got = {s: runs[(arm, s)] for s in seeds if key in runs.get((arm, s), {})}
    report.line("")
    report.line("### Multi-modal units (seed 003)")
    report.line("")
    report.line(f"Claim: {UNITS_CLAIM}. Measured on the `{arm}` runs (their unit head trains with `unit_hinge`).")
    report.line("")
    report.line(
        f"| queries, units (val unit rSum, query left out of its unit) | {' | '.join(f'seed {s}' for s in got)} |"
    )
    report.line("|---" * (len(got) + 1) + "|")
    for kind in ("caption", "keywords"):
        for fusion in UNIT_FUSIONS:
            cells = " | ".join(f"{r[f'unit_{kind}_{fusion}_rsum']:.1f}" for r in got.values())
            report.line(f"| {kind}, {fusion} | {cells} |")
    report.line("")
    report.line("| comparison | paired differences | mean | 95 % interval | verdict |")
    report.line("|---|---|---|---|---|")
    summary: dict[str, Any] = {"paper": "units", "arm": arm, "comparisons": []}
    for kind in ("caption", "keywords"):
        for a, b in (("trained", "image"), ("sum", "image"), ("trained", "sum")):
            diffs = [r[f"unit_{kind}_{a}_rsum"] - r[f"unit_{kind}_{b}_rsum"] for r in got.values()]
            mean, low, high = paired_interval(diffs)
            said = verdict(mean, low, high, None).replace(" (the paper claims no size comparable to this setting)", "")
            report.line(
                f"| {kind}: {a} − {b} | {', '.join(f'{d:+.1f}' for d in diffs)} | {mean:+.2f} | "
                f"{_interval(low, high)} | {said} |"
            )
            summary["comparisons"].append(
                {
                    "queries": kind,
                    "arm": a,
                    "against": b,
                    "differences": diffs,
                    "mean": mean,
                    "low": low,
                    "high": high,
                    "verdict": said,
                }
            )
    return summary


CLAIM = "training.pid"
"""A run directory's claim file: the pid of the process training it, so several drivers can share `--out`."""


def _claim(out: Path) -> bool:
    """Claims `out` for this process (False when a live process holds it; a dead process's claim is taken over)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / CLAIM
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(path.read_text() or "0"), 0)
                return False  # the holder is alive
            except (ProcessLookupError, ValueError):
                path.unlink(missing_ok=True)  # a stale claim
                continue
            except PermissionError:
                return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def _interval(low: float, high: float) -> str:
    """An interval as the table prints it ("–" when there is none: one pair)."""
    return "–" if math.isnan(low) else f"[{low:+.2f}, {high:+.2f}]"


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def _paper(
    report: Report, paper: Paper, runs: dict[tuple[str, int], dict[str, Any]], seeds: list[int]
) -> dict[str, Any] | None:
    """One paper's section: per-seed figures of every arm, the paired comparisons and their verdicts."""
    arms = [a for a in (*paper.baselines, paper.method, *paper.controls) if any((a, s) in runs for s in seeds)]
    if paper.method not in arms:
        return None
    report.line("")
    report.line(f"### {paper.name}")
    report.line("")
    report.line(f"Claim: {paper.claim}.")
    report.line("")
    header = " | ".join(f"seed {s}" for s in seeds)
    report.line(
        f"| arm (val rSum at the dev-chosen epoch) | {header} | mean | mean at last epoch | dev-chosen epochs |"
    )
    report.line("|---" * (len(seeds) + 4) + "|")
    for arm in arms:
        cells = [f"{runs[(arm, s)]['rsum']:.1f}" if (arm, s) in runs else "–" for s in seeds]
        got = [runs[(arm, s)] for s in seeds if (arm, s) in runs]
        epochs = ",".join(str(r["epoch"]) for r in got)
        mean, last = _mean([r["rsum"] for r in got]), _mean([r["last_rsum"] for r in got])
        report.line(f"| {arm} | {' | '.join(cells)} | {mean:.1f} | {last:.1f} | {epochs} |")
    for arm in arms:
        margins = [f"{runs[(arm, s)][MEAN_MARGIN]:.4f}" for s in seeds if MEAN_MARGIN in runs.get((arm, s), {})]
        if margins:
            report.line("")
            report.line(f"`{arm}`: mean in-batch margin at the dev-chosen epoch, per seed: {', '.join(margins)}.")
    # The tuned baseline: the candidate with the best mean dev rSum over the seeds it ran at all of.
    complete = [b for b in paper.baselines if all((b, s) in runs for s in seeds)]
    candidates = complete or [b for b in paper.baselines if b in arms]
    if not candidates:
        return None
    baseline = max(candidates, key=lambda b: _mean([runs[(b, s)]["dev_rsum"] for s in seeds if (b, s) in runs]))
    tuned = f"{len(complete)} of {len(paper.baselines)} candidates ran at every seed" if complete else "untuned"
    report.line("")
    report.line(f"Tuned baseline: `{baseline}` (best mean dev rSum; {tuned}: {', '.join(paper.baselines)}).")
    report.line("")
    report.line(
        "| comparison | seeds | paired differences (val rSum) | mean | 95 % interval | at last epoch: mean "
        "[interval] | verdict |"
    )
    report.line("|---|---|---|---|---|---|---|")
    summary: dict[str, Any] = {"paper": paper.key, "baseline": baseline, "comparisons": []}
    # In order, each comparison once: an extra pair may repeat a control's against the baseline, or turn a method −
    # control comparison around (the pair's orientation is the one kept).
    listed = [
        (paper.method, baseline),
        *((c, baseline) for c in paper.controls),
        *((paper.method, c) for c in paper.controls),
        *paper.pairs,
    ]
    pairs = [p for p in dict.fromkeys(listed) if p in paper.pairs or p[::-1] not in paper.pairs]
    for arm, other in pairs:
        both = [s for s in seeds if (arm, s) in runs and (other, s) in runs]
        if not both:
            continue
        diffs = [runs[(arm, s)]["rsum"] - runs[(other, s)]["rsum"] for s in both]
        at_last = [runs[(arm, s)]["last_rsum"] - runs[(other, s)]["last_rsum"] for s in both]
        mean, low, high = paired_interval(diffs)
        lmean, llow, lhigh = paired_interval(at_last)
        claimed = paper.claimed_points if (arm, other) == (paper.method, baseline) else None
        said = verdict(mean, low, high, claimed)
        if (arm, other) != (paper.method, baseline):
            said = said.replace(" (the paper claims no size comparable to this setting)", "")
        report.line(
            f"| {arm} − {other} | {','.join(map(str, both))} | {', '.join(f'{d:+.1f}' for d in diffs)} | "
            f"{mean:+.2f} | {_interval(low, high)} | {lmean:+.2f} {_interval(llow, lhigh)} | {said} |"
        )
        summary["comparisons"].append(
            {
                "arm": arm,
                "against": other,
                "seeds": both,
                "differences": diffs,
                "mean": mean,
                "low": low,
                "high": high,
                "last_mean": lmean,
                "last_low": llow,
                "last_high": lhigh,
                "verdict": said,
            }
        )
    graded_arms = [
        a for a in arms if all(k in runs.get((a, s), {}) for s in seeds if (a, s) in runs for k in GRADED_KEYS)
    ]
    if graded_arms:
        report.line("")
        note = f" ({paper.label_note})" if paper.label_note else ""
        report.line(
            f"Graded measures on val against lexical labels{note}, mean over the seeds (percent; relevant: own "
            f"captions or label >= {GRADED_THRESHOLD:g}):"
        )
        report.line("")
        report.line("| arm | " + " | ".join(GRADED_KEYS) + " |")
        report.line("|---" * (len(GRADED_KEYS) + 1) + "|")
        for arm in graded_arms:
            got = [runs[(arm, s)] for s in seeds if (arm, s) in runs]
            report.line(f"| {arm} | " + " | ".join(f"{_mean([r[k] for r in got]):.2f}" for k in GRADED_KEYS) + " |")
    mixed = [a for a in arms if any(f"mix_w{MIX_WEIGHTS[0]:g}_rsum" in runs.get((a, s), {}) for s in seeds)]
    for arm in mixed:
        got = [runs[(arm, s)] for s in seeds if (arm, s) in runs]
        swept = ", ".join(f"w = {w:g}: {_mean([r[f'mix_w{w:g}_rsum'] for r in got]):.1f}" for w in MIX_WEIGHTS)
        report.line("")
        report.line(f"`{arm}`, local share swept after training (val rSum, mean over the seeds): {swept}.")
    return summary


if __name__ == "__main__":
    sys.exit(main())
