"""`imgtxt eval --report DIR`: a self-contained HTML report — R@K, and contact sheets of example queries both ways.

Text -> image: a few captions, each with its top-5 images (the right image marked) and the rank of the right one.
Image -> text: a few images, each with its top-5 captions (its own captions marked). Thumbnails are embedded as data
URIs, so the one file can be mailed or attached to a CI run.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imgtxt.datasets import CaptionedImage

THUMB = 128
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1d2330; }
table.metrics td, table.metrics th { padding: 4px 10px; text-align: right; border-bottom: 1px solid #ddd; }
.query { margin: 18px 0 6px; font-weight: 600; }
.row { display: flex; gap: 10px; align-items: flex-start; }
figure { margin: 0; width: 132px; font-size: 12px; }
figure img { width: 128px; height: 128px; object-fit: cover; border: 3px solid transparent; border-radius: 4px; }
figure.right img { border-color: #1a9c48; }
.right-caption { color: #1a9c48; font-weight: 600; }
ol.captions { margin: 4px 0; }
.muted { color: #667085; }
"""


def _thumb(path: Path) -> str:
    with Image.open(path) as img:
        img.draft("RGB", (THUMB, THUMB))
        rgb = img.convert("RGB")
        rgb.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        rgb.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (deterministic: the same report for the same split)."""
    return sorted({int(i) for i in np.linspace(0, n - 1, num=min(k, n))}) if n else []


def example_queries(n_images: int, n_texts: int, queries: int = 6) -> tuple[list[int], list[int]]:
    """The caption columns (text -> image examples) and image rows (image -> text examples) a report shows."""
    return _spread(n_texts, queries), _spread(n_images, max(2, queries // 2))


def write_report(
    out_dir: Path,
    records: Sequence[CaptionedImage],
    sim: np.ndarray,
    owners: np.ndarray,
    result: dict[str, Any],
    queries: int = 6,
    top: int = 5,
) -> Path:
    """Writes `out_dir/report.html` and `out_dir/metrics.json`; returns the HTML file.

    Args:
        out_dir: Report directory (created).
        records: The evaluated images, in the rows of `sim`.
        sim: (n_images, n_texts) similarities; only the columns and rows of `example_queries` are read (the
            rest may be unknown, as through the index).
        owners: (n_texts,) the image row each caption belongs to.
        result: The evaluation's figures (R@K, rSum, source, split...).
        queries: Example queries each way.
        top: Results shown per query.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    captions = [c for r in records for c in r.captions]
    thumbs: dict[int, str] = {}

    def thumb(row: int) -> str:
        if row not in thumbs:
            thumbs[row] = _thumb(records[row].path)
        return thumbs[row]

    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
    parts = [
        "<!doctype html><meta charset='utf-8'><title>imgtxt evaluation report</title>",
        f"<style>{STYLE}</style>",
        "<h1>imgtxt evaluation</h1>",
        f"<p class='muted'>{html.escape(str(result.get('source', '')))} · split {html.escape(str(result.get('split')))}"
        f" · {len(records)} images × {len(captions)} captions</p>",
        "<table class='metrics'><tr>"
        + "".join(f"<th>{k.replace('_r', ' R@')}</th>" for k in keys)
        + "</tr><tr>"
        + "".join(f"<td>{float(result[k]):.1f}</td>" for k in keys if k in result)
        + "</tr></table>",
        "<h2>Text → image</h2>",
    ]
    text_examples, image_examples = example_queries(len(records), len(captions), queries)
    for col in text_examples:
        order = np.argsort(-sim[:, col], kind="stable")
        rank = int(np.nonzero(order == owners[col])[0][0]) + 1
        figures = []
        for row in order[:top]:
            right = " class='right'" if row == owners[col] else ""
            figures.append(
                f"<figure{right}><img src='{thumb(int(row))}' alt='{html.escape(records[row].key)}'>"
                f"<figcaption>{sim[row, col]:.3f}</figcaption></figure>"
            )
        parts.append(
            f"<p class='query'>“{html.escape(captions[col])}” <span class='muted'>(right image at rank "
            f"{rank})</span></p><div class='row'>{''.join(figures)}</div>"
        )
    parts.append("<h2>Image → text</h2>")
    for row in image_examples:
        order = np.argsort(-sim[row], kind="stable")
        own = set(np.nonzero(owners == row)[0].tolist())
        rank = int(min(np.nonzero(np.isin(order, list(own)))[0])) + 1
        items = []
        for col in order[:top]:
            cls = " class='right-caption'" if int(col) in own else ""
            items.append(f"<li{cls}>{html.escape(captions[col])} <span class='muted'>{sim[row, col]:.3f}</span></li>")
        parts.append(
            f"<div class='row'><figure class='right'><img src='{thumb(row)}' alt='{html.escape(records[row].key)}'>"
            f"<figcaption>{html.escape(records[row].key)} (first own caption at rank {rank})</figcaption></figure>"
            f"<ol class='captions'>{''.join(items)}</ol></div>"
        )
    page = out_dir / "report.html"
    page.write_text("\n".join(parts) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return page
