"""`imgtxt eval --via-index`: the standard R@K protocol run through the encoders and the vector store.

The split is indexed (images and captions) into its own collection, every image and caption is encoded again as a
query, and each query's ranking comes back from the store. Metrics come from `imgtxt.metrics`, the same code as the
offline evaluation, so with exact search both report identical numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from imgtxt.config import apply_env_defaults, positive_int
from imgtxt.datasets import CaptionedImage, default_data_root, load_captioned_images
from imgtxt.errors import ImgTxtError
from imgtxt.logs import add_logging_flags, setup_logging
from imgtxt.metrics import retrieval_metrics
from imgtxt.serving.result import EncodeResult
from indexer.encoding import Encoder
from indexer.ids import point_id
from indexer.options import (
    add_collection_flags,
    add_encoder_flags,
    add_search_flags,
    add_store_flags,
    build_encoder,
    collection_config,
    search_options,
)
from indexer.pipeline import IndexConfig, run_index
from indexer.reader import SourceRecord
from indexer.store import DEFAULT_SEARCH, CollectionConfig, SearchOptions, VectorStore, open_store

QUERY_BATCH = 64
# Below any cosine: a candidate the (approximate) search did not return ranks after every returned one.
MISSING = -2.0


def _encode_all(fn: Any, items: Sequence[Any], chunk: int = 256) -> np.ndarray:
    parts: list[EncodeResult] = [fn(list(items[i : i + chunk])) for i in range(0, len(items), chunk)]
    bad = [o.message for p in parts for o in p.outcomes if not o.ok]
    if bad:
        raise ImgTxtError(f"{len(bad)} evaluation items failed to encode, e.g. {bad[0]}")
    return np.concatenate([p.embeddings for p in parts]) if parts else np.zeros((0, 0), np.float32)


def _ranked_sims(
    store: VectorStore,
    queries: np.ndarray,
    target: str,
    columns: dict[str, int],
    options: SearchOptions,
    depth: int | None = None,
) -> np.ndarray:
    """(n_queries, n_columns) similarities as returned by the store; unreturned candidates get MISSING."""
    sim = np.full((len(queries), len(columns)), MISSING, np.float64)
    limit = min(depth or len(columns), len(columns))
    for start in range(0, len(queries), QUERY_BATCH):
        batch = queries[start : start + QUERY_BATCH]
        results = store.search(batch, target, limit, {"kind": target}, options, with_payload=False)
        for row, hits in enumerate(results, start):
            for h in hits:
                col = columns.get(h.id)
                if col is not None:  # other points of a shared collection (units, other splits) do not count
                    sim[row, col] = h.score
    return sim


def evaluate_via_index(
    items: list[CaptionedImage],
    encoder: Encoder,
    store: VectorStore,
    collection: str,
    config: CollectionConfig,
    options: SearchOptions = DEFAULT_SEARCH,
    reindex: bool = True,
    depth: int | None = None,
) -> dict[str, float]:
    """Indexes `items` into a fresh `collection` and measures R@K both ways through the store.

    Args:
        items: The evaluation split.
        encoder: Encodes the collection and the queries.
        store: The vector store.
        collection: Collection to (re)create, or with `reindex=False` one that already holds exactly these items.
        config: Collection options.
        options: Search options (`exact=True` reproduces the offline numbers).
        reindex: Delete and re-index the collection first.
        depth: Candidates asked per query. None asks for the full ranking (exact medr/meanr; but Qdrant then searches
            HNSW with ef >= collection size, i.e. exhaustively). A depth of 10 measures R@1/5/10 as a real top-10
            search would serve them; ranks past the depth are unknown, so medr/meanr are left out.

    Returns:
        The `imgtxt.metrics.retrieval_metrics` keys (i2t from image queries, t2i from caption queries), plus
        `n_images` and `n_texts`.
    """
    records = [SourceRecord(it.key, it.path, it.captions) for it in items]
    if reindex:
        store.delete_collection(collection)
        report = run_index(
            records, encoder, store, collection, config, IndexConfig(kinds=("image", "text"), progress=False)
        )
        if report.skipped or report.failed:
            raise ImgTxtError(f"{report.skipped + report.failed} evaluation items could not be indexed")
    else:
        store.open_collection(collection)
    texts = [(rec.text_key(j), t, i) for i, rec in enumerate(records) for j, t in enumerate(rec.texts)]
    image_cols = {point_id("image", rec.key): i for i, rec in enumerate(records)}
    text_cols = {point_id("text", key): n for n, (key, _, _) in enumerate(texts)}
    text_image_ids = np.array([i for _, _, i in texts])
    image_queries = _encode_all(encoder.encode_images, [Path(it.path).read_bytes() for it in items])
    text_queries = _encode_all(encoder.encode_texts, [t for _, t, _ in texts])
    i2t = retrieval_metrics(_ranked_sims(store, image_queries, "text", text_cols, options, depth), text_image_ids)
    t2i = retrieval_metrics(_ranked_sims(store, text_queries, "image", image_cols, options, depth).T, text_image_ids)
    out = {k: v for k, v in i2t.items() if k.startswith("i2t")} | {k: v for k, v in t2i.items() if k.startswith("t2i")}
    if depth is not None and depth < min(len(image_cols), len(text_cols)):
        out = {k: v for k, v in out.items() if not k.endswith(("medr", "meanr"))}
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return {**out, "n_images": float(len(records)), "n_texts": float(len(texts))}


def build_parser() -> argparse.ArgumentParser:
    """Flags of `imgtxt eval --via-index`."""
    p = argparse.ArgumentParser(
        prog="imgtxt eval --via-index", description="R@K through the encoder services (or in-process) and Qdrant."
    )
    p.add_argument("--via-index", action="store_true", help="(required by `imgtxt eval` to route here)")
    p.add_argument("--data", type=Path, default=default_data_root(), help="dataset file or directory")
    p.add_argument("--split", default="val", help="split to evaluate")
    p.add_argument("--limit", type=positive_int, help="evaluate on the first N images only")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument(
        "--depth",
        type=positive_int,
        help="candidates asked per query (e.g. 10: R@K as a top-10 search serves them, medr/meanr omitted); "
        "default: the full ranking",
    )
    add_encoder_flags(p)
    add_store_flags(p)
    add_collection_flags(p)
    add_search_flags(p)
    add_logging_flags(p)
    p.set_defaults(store=None)
    apply_env_defaults(p)
    return p


def format_metrics(m: dict[str, float]) -> str:
    """One human-readable line of R@K figures."""
    return (
        f"i2t R@1 {m['i2t_r1']:.1f} R@5 {m['i2t_r5']:.1f} R@10 {m['i2t_r10']:.1f} | "
        f"t2i R@1 {m['t2i_r1']:.1f} R@5 {m['t2i_r5']:.1f} R@10 {m['t2i_r10']:.1f} | rsum {m['rsum']:.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    """Runs the evaluation; 0 on success, 1 on errors."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.log_json)
    try:
        items = load_captioned_images(args.data, split=args.split, limit=args.limit)
        encoder, _ = build_encoder(args)
    except (ValueError, ImgTxtError, OSError, grpc.RpcError) as exc:
        print(f"imgtxt eval: error: {exc}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="imgtxt-eval-") as tmp:
        store = open_store(args.store or tmp, api_key=args.api_key, timeout=args.store_timeout, retries=args.retries)
        collection = args.collection or f"{encoder.bundle_version}-eval-{args.split}"
        try:
            metrics = evaluate_via_index(
                items,
                encoder,
                store,
                collection,
                collection_config(args, encoder.dim),
                search_options(args),
                depth=args.depth,
            )
        except (ValueError, ImgTxtError, OSError, grpc.RpcError) as exc:
            print(f"imgtxt eval: error: {exc}", file=sys.stderr)
            return 1
        finally:
            store.close()
            encoder.close()
    print(json.dumps(metrics, sort_keys=True) if args.json else format_metrics(metrics))
    return 0
