"""`imgtxt eval`: the standard R@K protocol in three modes of one command, over one metrics module.

- `--bundle DIR`: the bundle's ONNX towers through the encoder layer (no torch), at `--precision` (`auto`: per tower,
  as the services choose).
- `--checkpoint PATH`: a training checkpoint's PyTorch towers (needs `imgtxt[train]`).
- `--via-index`: through the encoder services (or `--in-process --bundle DIR`) and the vector store, as served.

Every mode prints one line of R@K figures (or, with `--json -`, the JSON) and writes the JSON to `--json PATH`.
`IMGTXT_VIA_INDEX=1` selects the third mode as `--via-index` does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from evaluation.judgments import FORMATS, graded_correlation, load_judgments
from imgtxt.config import apply_env_defaults, positive_int
from imgtxt.datasets import CaptionedImage, default_data_root, load_captioned_images
from imgtxt.errors import ConfigError, ImgTxtError, exit_code
from imgtxt.logs import add_logging_flags, setup_logging
from imgtxt.retrieval_metrics import format_metrics, retrieval_metrics


def build_parser() -> argparse.ArgumentParser:
    """Flags of `imgtxt eval` (all modes)."""
    from imgtxt.flags import HelpFormatter, add_encoder_flags, add_json_flag
    from store.options import add_collection_flags, add_search_flags, add_store_flags

    parser = argparse.ArgumentParser(
        prog="imgtxt eval",
        description="Image–text retrieval evaluation (R@K, rSum, median rank) of a bundle (--bundle), a training "
        "checkpoint (--checkpoint) or the served system (--via-index: encoders + vector store).",
        formatter_class=HelpFormatter,
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
    data.add_argument(
        "--split", default="val", help="split to evaluate: one split (train, val, test, restval), never `all`"
    )
    data.add_argument("--limit", type=positive_int, help="only the first N records (images) of the split")
    data.add_argument(
        "--judgments",
        type=Path,
        help="graded human judgments (Flickr8k ExpertAnnotations.txt, CrowdFlowerAnnotations.txt, or this "
        "project's TSV): Kendall tau-c and tau-b over all judged pairs",
    )
    data.add_argument("--judgments-format", choices=FORMATS, default="auto", help="format of --judgments")
    data.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="write DIR/report.html: R@K and contact sheets of example queries both ways (every mode)",
    )
    data.add_argument(
        "--batch-size", type=positive_int, default=32, help="records (images with their captions) per encoding batch"
    )
    add_json_flag(data, "the results")  # type: ignore[arg-type]
    # --bundle and --device belong to the encoder flags: the bundle mode, and the in-process via-index mode.
    add_encoder_flags(parser)
    via = parser.add_argument_group("--via-index only")
    via.add_argument(
        "--depth",
        type=positive_int,
        help="candidates asked per query (e.g. 10: R@K as a top-10 search serves them, medr/meanr omitted); "
        "default: the full ranking",
    )
    via.add_argument(
        "--reuse",
        action="store_true",
        help="evaluate the existing --collection (default: the bundle version; an alias works) as an indexing job "
        "built it, without reindexing; it must hold exactly the split's points",
    )
    # via-index: a temporary embedded store unless one is named (with --reuse: the default store of `imgtxt index`).
    add_store_flags(parser, default=None)
    add_collection_flags(parser)
    add_search_flags(parser)
    add_logging_flags(parser)
    apply_env_defaults(parser)
    return parser


def _offline(args: argparse.Namespace, records: list[CaptionedImage]) -> dict[str, Any]:
    from evaluation.offline import encode_with_checkpoint
    from imgtxt.encoders.bulk import encode_with_bundle

    paths = [r.path for r in records]
    captions = [c for r in records for c in r.captions]
    owners = np.asarray([i for i, r in enumerate(records) for _ in r.captions], dtype=np.int64)
    t0 = time.perf_counter()
    precision: dict[str, str] = {}
    if args.bundle is not None:
        img, txt, precision = encode_with_bundle(
            args.bundle, paths, captions, args.batch_size, args.device, args.precision
        )
    else:
        img, txt = encode_with_checkpoint(args.checkpoint, paths, captions, args.batch_size)
    sim = img @ txt.T
    result: dict[str, Any] = {
        "source": str(args.bundle or args.checkpoint),
        **({"precision": precision} if precision else {}),
        "split": args.split,
        "n_images": len(records),
        "n_texts": len(captions),
        "encode_s": round(time.perf_counter() - t0, 2),
        **retrieval_metrics(sim, owners),
    }
    if args.judgments is not None:
        pairs = load_judgments(args.judgments, records, args.judgments_format)
        result.update(graded_correlation(sim[pairs.rows, pairs.cols], pairs))
    if args.report is not None:
        from evaluation.report import write_report

        result["report"] = str(write_report(args.report, records, sim, owners, result))
    return result


def _via_index(args: argparse.Namespace, records: list[CaptionedImage]) -> dict[str, Any]:
    from evaluation.via_index import evaluate_via_index
    from imgtxt.flags import build_encoder
    from store.factory import open_store
    from store.options import DEFAULT_STORE, check_given, collection_config, recreate_collection, search_options

    encoder, _ = build_encoder(args)
    try:
        config, warnings = collection_config(args, encoder.identity)
        own = f"{encoder.bundle_version}-eval-{args.split}"
        with tempfile.TemporaryDirectory(prefix="imgtxt-eval-") as tmp:
            location = args.store or (DEFAULT_STORE if args.reuse else tmp)
            store = open_store(location, api_key=args.api_key, timeout=args.store_timeout, retries=args.retries)
            try:
                name = args.collection or (encoder.bundle_version if args.reuse else own)
                collection = store.resolve(name)
                if args.reuse:
                    check_given(name, store.collection_config(name), args)
                elif name != own and not args.recreate and _exists(store, name):
                    raise ConfigError(  # EXIT_USAGE: the flags, not the run, are wrong
                        f"collection {name!r} exists in {location}: pass --reuse to evaluate it as it was built, or "
                        "--recreate to delete it (and every point in it) and index the split into it"
                    )
                if not args.reuse and _exists(store, name):
                    recreate_collection(store, name)  # refused while aliases point at it
                metrics: dict[str, Any] = evaluate_via_index(
                    records,
                    encoder,
                    store,
                    collection,
                    config,
                    search_options(args),
                    reindex=not args.reuse,
                    depth=args.depth,
                    batch_size=args.batch_size,
                )
                if args.report is not None:
                    from evaluation.report import example_queries, write_report
                    from evaluation.via_index import example_sims_via_index

                    owners = np.asarray([i for i, r in enumerate(records) for _ in r.captions], dtype=np.int64)
                    cols, rows = example_queries(len(records), len(owners))
                    sim = example_sims_via_index(records, encoder, store, collection, search_options(args), cols, rows)
                    report_path = write_report(args.report, records, sim, owners, {"source": name, **metrics})
                    metrics = {**metrics, "report": str(report_path)}
                if args.judgments is not None:
                    from evaluation.via_index import judged_scores_via_index

                    pairs = load_judgments(args.judgments, records, args.judgments_format)
                    scores = judged_scores_via_index(pairs, records, encoder, store, collection, search_options(args))
                    metrics = {**metrics, **graded_correlation(scores, pairs)}
                stored = store.collection_config(collection).to_dict()
            finally:
                store.close()
    finally:
        encoder.close()
    return {
        "source": f"index:{collection}",
        "split": args.split,
        "reused": args.reuse,
        "collection_config": stored,
        **({"warnings": warnings} if warnings and not args.reuse else {}),
        **metrics,
    }


def _exists(store: Any, name: str) -> bool:
    try:
        store.collection_config(name)
    except KeyError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    """`imgtxt eval`: 0 on success, 1 on errors, 2 on bad usage."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.log_json)
    if args.split == "all":
        parser.error("--split all: an evaluation measures one split (train, val, test or restval)")
    if args.via_index:
        if args.checkpoint is not None:
            parser.error("--checkpoint cannot be evaluated --via-index: export it to a bundle first")
        if args.reuse and args.recreate:
            parser.error("--reuse evaluates a collection as built; --recreate deletes it: give one")
    elif (args.bundle is None) == (args.checkpoint is None):
        parser.error("give exactly one of --bundle, --checkpoint or --via-index")
    elif args.reuse:
        parser.error("--reuse needs --via-index")
    try:
        records = load_captioned_images(args.data, args.split, args.limit)
        if not records:
            raise ImgTxtError(f"split {args.split!r} of {args.data} is empty")
        result = _via_index(args, records) if args.via_index else _offline(args, records)
    except (ValueError, KeyError, ImgTxtError, OSError, grpc.RpcError) as exc:
        print(f"imgtxt eval: error: {exc}", file=sys.stderr)
        return exit_code(exc)
    from imgtxt.flags import emit

    emit(args.json, result, lambda: print(format_metrics(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
