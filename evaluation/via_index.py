"""`imgtxt eval --via-index`: the standard R@K protocol run through the encoders and the vector store.

The split is indexed (images and captions) into its own collection, every image and caption is encoded again as a
query, and each query's ranking comes back from the store. Metrics come from `imgtxt.retrieval_metrics`, the same
code as the offline evaluation, so with exact search both report identical numbers.
"""

from __future__ import annotations

import numpy as np

from evaluation.offline import encode_all
from imgtxt.datasets import CaptionedImage
from imgtxt.encoders.types import Encoder
from imgtxt.errors import ImgTxtError
from imgtxt.retrieval_metrics import retrieval_metrics
from indexer.ids import point_id
from indexer.pipeline import IndexConfig, run_index
from indexer.reader import SourceRecord
from indexer.stores.base import DEFAULT_SEARCH, CollectionConfig, SearchOptions, VectorStore

QUERY_BATCH = 64
# Below any cosine: a candidate the (approximate) search did not return ranks after every returned one.
MISSING = -2.0


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
        The `imgtxt.retrieval_metrics.retrieval_metrics` keys (i2t from image queries, t2i from caption queries), plus
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
    image_queries = encode_all(
        lambda chunk: encoder.encode_images([p.read_bytes() for p in chunk]), [it.path for it in items]
    )
    text_queries = encode_all(encoder.encode_texts, [t for _, t, _ in texts])
    i2t = retrieval_metrics(_ranked_sims(store, image_queries, "text", text_cols, options, depth), text_image_ids)
    t2i = retrieval_metrics(_ranked_sims(store, text_queries, "image", image_cols, options, depth).T, text_image_ids)
    out = {k: v for k, v in i2t.items() if k.startswith("i2t")} | {k: v for k, v in t2i.items() if k.startswith("t2i")}
    if depth is not None and depth < min(len(image_cols), len(text_cols)):
        out = {k: v for k, v in out.items() if not k.endswith(("medr", "meanr"))}
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return {**out, "n_images": float(len(records)), "n_texts": float(len(texts))}
