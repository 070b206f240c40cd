"""Entry point `imgtxt index`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import grpc

from imgtxt.config import apply_env_defaults, non_negative_int, positive_int
from imgtxt.encoders.unit import UnitEncoder
from imgtxt.errors import ImgTxtError
from imgtxt.logs import add_logging_flags, setup_logging
from indexer.ids import KINDS
from indexer.options import (
    add_collection_flags,
    add_encoder_flags,
    add_store_flags,
    build_encoder,
    collection_config,
)
from indexer.pipeline import IndexConfig, IndexReport, run_index
from indexer.reader import SOURCE_KINDS, read_records, source_fingerprint
from indexer.shard_checkpoint import checkpoint_path
from indexer.stores.base import DimensionMismatch
from indexer.stores.factory import is_url, open_store

logger = logging.getLogger(__name__)


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    if not kinds or any(k not in KINDS for k in kinds):
        raise argparse.ArgumentTypeError(f"kinds must be a comma-separated subset of {KINDS}, got {text!r}")
    return kinds


def index_parser() -> argparse.ArgumentParser:
    """Flags of `imgtxt index`."""
    p = argparse.ArgumentParser(
        prog="imgtxt index", description="Encode images, captions and image+caption units and write them into Qdrant."
    )
    p.add_argument("source", type=Path, help="dataset_*.json (or its directory), JSONL manifest, or image folder")
    p.add_argument("--source-kind", choices=SOURCE_KINDS, default="auto", help="how to read the source")
    p.add_argument("--split", help="dataset split to index (train, val, ...); default: all")
    p.add_argument("--limit", type=positive_int, help="index only the first N records (quick runs)")
    p.add_argument("--kinds", type=_kinds, default=KINDS, help="points to write: image,text,unit (default all)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="records per batch")
    p.add_argument("--queue-depth", type=positive_int, default=4, help="batches buffered between stages")
    p.add_argument("--checkpoint-every", type=positive_int, default=4, help="batches between checkpoints")
    p.add_argument("--checkpoint-dir", type=Path, help="checkpoints (default: <store>/_checkpoints, or ./artifacts)")
    p.add_argument("--rejects", type=Path, help="rejects JSONL (default: beside the checkpoint)")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--shard-index", type=non_negative_int, default=0, help="which shard of the input to index")
    p.add_argument("--num-shards", type=positive_int, default=1, help="shards the input is split into (by key hash)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any item was skipped or failed")
    p.add_argument("--json", action="store_true", help="print the final report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_encoder_flags(p)
    add_store_flags(p)
    add_collection_flags(p)
    add_logging_flags(p)
    apply_env_defaults(p)
    return p


def _print_report(report: IndexReport, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_dict(), sort_keys=True))
        return
    per_kind = ", ".join(f"{k} {v}" for k, v in report.indexed.items()) or "nothing"
    print(
        f"indexed {report.total_indexed} points ({per_kind}) into {report.collection}; skipped {report.skipped}, "
        f"failed {report.failed}; {report.records} records ({report.resumed_from} resumed); "
        f"{report.elapsed_s:.1f} s, {report.rate:.1f} points/s"
    )
    if report.skipped or report.failed:
        print(f"rejects listed in {report.rejects_file}")


def main(argv: list[str] | None = None) -> int:
    """`imgtxt index`: returns 0 on success, 1 on errors (or rejects with --strict), 2 on bad usage."""
    parser = index_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.log_json)
    if args.shard_index >= args.num_shards:
        parser.error(f"--shard-index must be < --num-shards ({args.num_shards})")
    try:
        encoder, bundle = build_encoder(args)
    except (ValueError, ImgTxtError, OSError, grpc.RpcError) as exc:
        print(f"imgtxt index: error: {exc}", file=sys.stderr)
        return 2
    if "unit" in args.kinds and bundle is None and args.kinds != KINDS:
        print("imgtxt index: error: unit points need --bundle (its fusion head)", file=sys.stderr)
        return 2
    kinds = args.kinds if bundle is not None or args.kinds != KINDS else ("image", "text")
    if kinds != args.kinds:
        logger.warning("no --bundle: unit points need the bundle's fusion head, so only image and text points are made")
    collection = args.collection or encoder.bundle_version
    store_loc = str(args.store)
    cp_dir = args.checkpoint_dir or (
        Path("artifacts") / "checkpoints"
        if is_url(store_loc) or store_loc == ":memory:"
        else Path(store_loc.removeprefix("local:")) / "_checkpoints"
    )
    cp = checkpoint_path(cp_dir, collection, args.shard_index, args.num_shards)
    rejects = args.rejects or cp.with_name(f"rejects-{args.shard_index}-of-{args.num_shards}.jsonl")
    # An in-memory store forgets everything at exit: a checkpoint would claim points that no longer exist.
    checkpoint = None if store_loc == ":memory:" else cp
    job = {
        "source": str(args.source.resolve()),
        "fingerprint": source_fingerprint(args.source),
        "split": args.split,
        "limit": args.limit,
        "shard": [args.shard_index, args.num_shards],
    }
    store = open_store(store_loc, api_key=args.api_key, timeout=args.store_timeout, retries=args.retries)
    try:
        records = read_records(args.source, args.source_kind, args.split, args.limit, args.shard_index, args.num_shards)
        report = run_index(
            records,
            encoder,
            store,
            collection,
            collection_config(args, encoder.dim),
            IndexConfig(
                kinds, args.batch_size, args.queue_depth, args.checkpoint_every, None if not args.no_progress else False
            ),
            fusion=UnitEncoder(bundle),
            checkpoint=checkpoint,
            job=job,
            rejects=rejects,
            restart=args.restart,
        )
    except (DimensionMismatch, ImgTxtError, ValueError, OSError, grpc.RpcError) as exc:
        print(f"imgtxt index: error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
        encoder.close()
    _print_report(report, args.json)
    return 1 if args.strict and (report.skipped or report.failed) else 0
