"""Training curves as a picture: loss terms and val R@K per epoch, drawn from a run's `metrics.jsonl`."""

from __future__ import annotations

import json
from pathlib import Path

RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def plot_curves(metrics_jsonl: Path, out_png: Path) -> Path:
    """Draws `metrics_jsonl` (one JSON object per epoch) into `out_png`: training losses left, val R@K and rSum right.

    Returns:
        `out_png`.

    Raises:
        ValueError: The file holds no epoch.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{metrics_jsonl} holds no epoch")
    epochs = [r["epoch"] for r in records]
    losses = sorted({k for r in records for k in r if k.startswith("train_") and k != "train_s"})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for name in losses:
        left.plot(
            epochs,
            [r.get(name) for r in records],
            marker="o",
            ms=3,
            lw=2 if name == "train_loss" else 1,
            label=name.removeprefix("train_"),
        )
    left.set(title="training loss", xlabel="epoch")
    left.legend(fontsize=8)
    for name in RECALLS:
        right.plot(
            epochs,
            [r.get(name) for r in records],
            marker="o",
            ms=3,
            lw=1,
            ls="-" if name.startswith("i2t") else "--",
            label=name.replace("_r", " R@"),
        )
    right.set(title="val R@K (%)", xlabel="epoch", ylim=(0, 100))
    rsum = right.twinx()
    rsum.plot(epochs, [r.get("rsum") for r in records], color="black", lw=2, marker="s", ms=4, label="rSum")
    rsum.set_ylabel("rSum")
    best = max(records, key=lambda r: r.get("rsum", float("-inf")))
    rsum.annotate(
        f"best {best['rsum']:.1f}",
        (best["epoch"], best["rsum"]),
        textcoords="offset points",
        xytext=(0, 8),
        ha="center",
        fontsize=8,
    )
    handles = right.get_legend_handles_labels()[0] + rsum.get_legend_handles_labels()[0]
    right.legend(handles, [h.get_label() for h in handles], fontsize=7, ncol=2, loc="lower right")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
