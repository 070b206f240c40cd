"""`imgtxt eval --via-index`: the standard R@K protocol run through the encoders and the vector store.

The split is indexed (images and captions) into its own collection, or an existing collection an indexing job built
is reused as it is (after checking that it holds exactly the split's points); every image and caption is encoded
again as a query, and each query's ranking comes back from the store. Metrics come from `imgtxt.retrieval_metrics`,
the same code as the offline evaluation, so with exact search both report identical numbers.
"""

from __future__ import annotations

import numpy as np

from evaluation.judgments import JudgedPairs
from imgtxt.datasets import CaptionedImage
from imgtxt.encoders.bulk import encode_all
from imgtxt.encoders.types import Encoder
from imgtxt.errors import ImgTxtError, InvalidInput
from imgtxt.retrieval_metrics import retrieval_metrics
from indexer import IndexConfig, SourceRecord, run_index
from store.base import DEFAULT_SEARCH, CollectionConfig, SearchOptions, VectorStore
from store.identity import check_identity
from store.ids import point_id


def check_holds_exactly(store: VectorStore, collection: str, image_ids: list[str], text_ids: list[str]) -> None:
    """Checks that the collection holds exactly these image and text points.

    Raises:
        InvalidInput: Points of the split are missing, or the collection holds other image or text points (another
            split, another --limit); the message says which and how many.
    """
    n_images, n_texts = store.count(collection, {"kind": "image"}), store.count(collection, {"kind": "text"})
    found = store.retrieve(collection, image_ids + text_ids)
    missing = len(image_ids) + len(text_ids) - len(found)
    if missing or n_images != len(image_ids) or n_texts != len(text_ids):
        raise InvalidInput(
            f"collection {collection!r} does not hold exactly the split's points: it has {n_images} image and "
            f"{n_texts} text points, the split {len(image_ids)} images and {len(text_ids)} captions, of which "
            f"{missing} are missing; index exactly this split into it (imgtxt index DATA --split SPLIT [--limit N]) "
            "or evaluate without --reuse"
        )


QUERY_BATCH = 64
# Below any cosine: a candidate the (approximate) search did not return ranks after every returned one.
MISSING = -2.0


def _ranked_sims(
    store: VectorStore,
    collection: str,
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
        results = store.search(collection, batch, target, limit, {"kind": target}, options, with_payload=False)
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
    batch_size: int = 32,
) -> dict[str, float]:
    """Indexes `items` into a fresh `collection` (or reuses one) and measures R@K both ways through the store.

    Args:
        items: The evaluation split.
        encoder: Encodes the collection and the queries.
        store: The vector store.
        collection: Collection to (re)create, or with `reindex=False` one that already holds exactly these items
            (checked: `check_holds_exactly`).
        config: Collection options (used when reindexing).
        options: Search options (`exact=True` reproduces the offline numbers).
        reindex: Delete and re-index the collection first.
        depth: Candidates asked per query. None asks for the full ranking (exact medr/meanr; but Qdrant then searches
            HNSW with ef >= collection size, i.e. exhaustively). A depth of 10 measures R@1/5/10 as a real top-10
            search would serve them; ranks past the depth are unknown, so medr/meanr are left out.
        batch_size: Records per indexing batch, and queries per encoding call.

    Raises:
        ImgTxtError: An item could not be indexed or encoded, or a reused collection does not hold exactly `items`.

    Returns:
        The `imgtxt.retrieval_metrics.retrieval_metrics` keys (i2t from image queries, t2i from caption queries), plus
        `n_images` and `n_texts`.
    """
    records = [SourceRecord(it.key, it.path, it.captions) for it in items]
    texts = [(rec.text_key(j), t, i) for i, rec in enumerate(records) for j, t in enumerate(rec.texts)]
    image_cols = {point_id("image", rec.key): i for i, rec in enumerate(records)}
    text_cols = {point_id("text", key): n for n, (key, _, _) in enumerate(texts)}
    if reindex:
        store.delete_collection(collection)
        report = run_index(
            records,
            encoder,
            store,
            collection,
            config,
            IndexConfig(kinds=("image", "text"), batch_size=batch_size, progress=False),
        )
        if report.skipped or report.failed:
            raise ImgTxtError(f"{report.skipped + report.failed} evaluation items could not be indexed")
    else:
        # The reader's side of the collection contract: the bundle that wrote it encodes the queries.
        check_identity(collection, store.collection_identity(collection), encoder.identity, "search")
        check_holds_exactly(store, collection, list(image_cols), list(text_cols))
    text_image_ids = np.array([i for _, _, i in texts])
    image_queries = encode_all(
        lambda chunk: encoder.encode_images([p.read_bytes() for p in chunk]), [it.path for it in items], batch_size
    )
    text_queries = encode_all(encoder.encode_texts, [t for _, t, _ in texts], batch_size)
    i2t = retrieval_metrics(
        _ranked_sims(store, collection, image_queries, "text", text_cols, options, depth), text_image_ids
    )
    t2i = retrieval_metrics(
        _ranked_sims(store, collection, text_queries, "image", image_cols, options, depth).T, text_image_ids
    )
    out = {k: v for k, v in i2t.items() if k.startswith("i2t")} | {k: v for k, v in t2i.items() if k.startswith("t2i")}
    if depth is not None and depth < min(len(image_cols), len(text_cols)):
        out = {k: v for k, v in out.items() if not k.endswith(("medr", "meanr"))}
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return {**out, "n_images": float(len(records)), "n_texts": float(len(texts))}


def judged_scores_via_index(
    pairs: JudgedPairs,
    items: list[CaptionedImage],
    encoder: Encoder,
    store: VectorStore,
    collection: str,
    options: SearchOptions,
) -> np.ndarray:
    """The store's score of each judged (image, caption) pair: the judged image is the query, and the search is
    restricted to the judged caption's point (`key` filter), so the score is what the index serves for that pair."""
    rows = sorted(set(pairs.rows.tolist()))
    images = encode_all(lambda chunk: encoder.encode_images([items[r].path.read_bytes() for r in chunk]), rows)
    query = dict(zip(rows, images, strict=True))
    out = np.full(len(pairs), MISSING, np.float64)
    for n, (row, (_, caption_image, k)) in enumerate(zip(pairs.rows.tolist(), pairs.keys, strict=True)):
        (hits,) = store.search(
            collection, query[row][None], "text", 1, {"kind": "text", "key": f"{caption_image}#{k}"}, options
        )
        if hits:
            out[n] = hits[0].score
    return out


def example_sims_via_index(
    items: list[CaptionedImage],
    encoder: Encoder,
    store: VectorStore,
    collection: str,
    options: SearchOptions,
    text_examples: list[int],
    image_examples: list[int],
) -> np.ndarray:
    """(n_images, n_texts) similarities as the index ranks them, for a report's example queries only: the columns
    `text_examples` (caption queries over the image points) and the rows `image_examples` (image queries over the
    caption points); every other cell is MISSING."""
    records = [SourceRecord(it.key, it.path, it.captions) for it in items]
    texts = [(rec.text_key(j), t) for rec in records for j, t in enumerate(rec.texts)]
    image_cols = {point_id("image", rec.key): i for i, rec in enumerate(records)}
    text_cols = {point_id("text", key): n for n, (key, _) in enumerate(texts)}
    sim = np.full((len(records), len(texts)), MISSING, np.float64)
    captions = encode_all(encoder.encode_texts, [texts[c][1] for c in text_examples])
    sim[:, text_examples] = _ranked_sims(store, collection, captions, "image", image_cols, options).T
    images = encode_all(
        lambda chunk: encoder.encode_images([items[r].path.read_bytes() for r in chunk]), image_examples
    )
    sim[image_examples] = _ranked_sims(store, collection, images, "text", text_cols, options)
    return sim
