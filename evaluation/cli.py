"""`imgtxt eval`: the standard R@K protocol in three modes of one command, over one metrics module.

- `--bundle DIR`: the bundle's ONNX towers through the encoder layer (no torch).
- `--checkpoint PATH`: a training checkpoint's PyTorch towers (needs `imgtxt[train]`).
- `--via-index`: through the encoder services (or `--in-process --bundle DIR`) and the vector store, as served.

Every mode prints one line of R@K figures (or, with `--json -`, the JSON) and writes the JSON to `--json PATH`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from evaluation.judgments import read_judgments
from imgtxt.config import apply_env_defaults, positive_int
from imgtxt.datasets import CaptionedImage, default_data_root, load_captioned_images
from imgtxt.errors import ImgTxtError
from imgtxt.logs import add_logging_flags, setup_logging
from imgtxt.retrieval_metrics import format_metrics, graded_kendall_tau, retrieval_metrics


def build_parser() -> argparse.ArgumentParser:
    """Flags of `imgtxt eval` (all modes)."""
    from indexer.options import add_collection_flags, add_encoder_flags, add_search_flags, add_store_flags

    parser = argparse.ArgumentParser(
        prog="imgtxt eval",
        description="Image–text retrieval evaluation (R@K, rSum, median rank) of a bundle (--bundle), a training "
        "checkpoint (--checkpoint) or the served system (--via-index: encoders + vector store).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    mode = parser.add_argument_group("mode (one of --bundle, --checkpoint, --via-index)")
    mode.add_argument("--checkpoint", type=Path, help="training checkpoint (PyTorch; needs imgtxt[train])")
    mode.add_argument(
        "--via-index",
        action="store_true",
        help="index the split and query it through the encoder services (or --in-process --bundle) and Qdrant",
    )
    data = parser.add_argument_group("data and output")
    data.add_argument("--data", type=Path, default=default_data_root(), help="dataset file or directory")
    data.add_argument("--split", default="val", help="split to evaluate")
    data.add_argument("--limit", type=positive_int, help="evaluate the first N images only")
    data.add_argument("--judgments", type=Path, help="graded judgments TSV for Kendall τ (bundle/checkpoint modes)")
    data.add_argument("--batch-size", type=positive_int, default=32, help="images per encoding batch")
    data.add_argument("--json", help="write the results as JSON to this file ('-': print them instead of the line)")
    # --bundle and --device belong to the encoder flags: the bundle mode, and the in-process via-index mode.
    add_encoder_flags(parser)
    via = parser.add_argument_group("--via-index only")
    via.add_argument(
        "--depth",
        type=positive_int,
        help="candidates asked per query (e.g. 10: R@K as a top-10 search serves them, medr/meanr omitted); "
        "default: the full ranking",
    )
    add_store_flags(parser)
    add_collection_flags(parser)
    add_search_flags(parser)
    parser.set_defaults(store=None)  # via-index: a temporary embedded store unless one is named
    add_logging_flags(parser)
    apply_env_defaults(parser)
    return parser


def _offline(args: argparse.Namespace, records: list[CaptionedImage]) -> dict[str, Any]:
    from evaluation.offline import encode_with_bundle, encode_with_checkpoint

    paths = [r.path for r in records]
    captions = [c for r in records for c in r.captions]
    owners = np.asarray([i for i, r in enumerate(records) for _ in r.captions], dtype=np.int64)
    t0 = time.perf_counter()
    if args.bundle is not None:
        img, txt = encode_with_bundle(args.bundle, paths, captions, args.batch_size, args.device)
    else:
        img, txt = encode_with_checkpoint(args.checkpoint, paths, captions, args.batch_size)
    sim = img @ txt.T
    result: dict[str, Any] = {
        "source": str(args.bundle or args.checkpoint),
        "split": args.split,
        "n_images": len(records),
        "n_texts": len(captions),
        "encode_s": round(time.perf_counter() - t0, 2),
        **retrieval_metrics(sim, owners),
    }
    if args.judgments is not None:
        rows = {r.key: i for i, r in enumerate(records)}
        result.update(graded_kendall_tau(sim, read_judgments(args.judgments, rows, len(captions))))
    return result


def _via_index(args: argparse.Namespace, records: list[CaptionedImage]) -> dict[str, Any]:
    from evaluation.via_index import evaluate_via_index
    from indexer.options import build_encoder, collection_config, search_options
    from indexer.stores.factory import open_store

    encoder, _ = build_encoder(args)
    try:
        with tempfile.TemporaryDirectory(prefix="imgtxt-eval-") as tmp:
            store = open_store(
                args.store or tmp, api_key=args.api_key, timeout=args.store_timeout, retries=args.retries
            )
            collection = args.collection or f"{encoder.bundle_version}-eval-{args.split}"
            try:
                metrics = evaluate_via_index(
                    records,
                    encoder,
                    store,
                    collection,
                    collection_config(args, encoder.dim),
                    search_options(args),
                    depth=args.depth,
                )
            finally:
                store.close()
    finally:
        encoder.close()
    return {"source": f"index:{collection}", "split": args.split, **metrics}


def main(argv: list[str] | None = None) -> int:
    """`imgtxt eval`: 0 on success, 1 on errors, 2 on bad usage."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.log_json)
    if args.via_index:
        if args.checkpoint is not None:
            parser.error("--checkpoint cannot be evaluated --via-index: export it to a bundle first")
        if args.judgments is not None:
            parser.error("--judgments needs the bundle or checkpoint mode (it scores the full similarity matrix)")
    elif (args.bundle is None) == (args.checkpoint is None):
        parser.error("give exactly one of --bundle, --checkpoint or --via-index")
    try:
        records = load_captioned_images(args.data, args.split, args.limit)
        if not records:
            raise ImgTxtError(f"split {args.split!r} of {args.data} is empty")
        result = _via_index(args, records) if args.via_index else _offline(args, records)
    except (ValueError, ImgTxtError, OSError, grpc.RpcError) as exc:
        print(f"imgtxt eval: error: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.json and args.json != "-":
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text if args.json == "-" else format_metrics(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
