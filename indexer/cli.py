"""Entry point `imgtxt index`."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import grpc

from imgtxt.bundle import Bundle
from imgtxt.config import apply_env_defaults, non_negative_int, positive_int
from imgtxt.encoders.unit import FALLBACK, UnitEncoder
from imgtxt.errors import EXIT_FAILURE, EXIT_OK, ImgTxtError, exit_code
from imgtxt.flags import HelpFormatter, add_encoder_flags, add_json_flag, build_encoder, default_home, emit
from imgtxt.logs import add_logging_flags, setup_logging
from indexer.pipeline import IndexConfig, IndexReport, run_index
from indexer.plan import needs
from indexer.reader import SOURCE_KINDS, detect_kind, read_records, source_fingerprint
from indexer.shard_checkpoint import checkpoint_path, unfinished_shards
from store.base import CollectionMismatch
from store.factory import is_url, open_store
from store.ids import KINDS
from store.options import (
    add_collection_flags,
    add_store_flags,
    collection_config,
    collection_for,
    recreate_collection,
    refuse_misplaced,
)

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINTS = default_home() / "checkpoints"

SPLIT_HELP = (
    "dataset split to index: train, val, test, restval, or all (default: val, the split `imgtxt eval` and "
    "`imgtxt demo` evaluate, so a default index is one `imgtxt eval --via-index --reuse` can measure); dataset "
    "sources only"
)


class UsageError(ValueError):
    """Flags that cannot work together (exit code 2)."""


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    if not kinds or any(k not in KINDS for k in kinds):
        raise argparse.ArgumentTypeError(f"kinds must be a comma-separated subset of {KINDS}, got {text!r}")
    return kinds


def index_parser() -> argparse.ArgumentParser:
    """Flags of `imgtxt index`."""
    p = argparse.ArgumentParser(
        prog="imgtxt index",
        description="Encode images, captions and image+caption units and write them into Qdrant.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("source", type=Path, help="dataset_*.json (or its directory), JSONL manifest, or image folder")
    p.add_argument("--source-kind", choices=SOURCE_KINDS, default="auto", help="how to read the source")
    p.add_argument("--split", help=SPLIT_HELP)
    p.add_argument("--limit", type=positive_int, help="only the first N records (images) of the input")
    p.add_argument(
        "--kinds",
        type=_kinds,
        default=",".join(KINDS),
        help="points to write, a subset of image,text,unit (unit needs a trained unit head, or --untrained-fusion)",
    )
    p.add_argument(
        "--untrained-fusion",
        action="store_true",
        help=f"make unit vectors with {FALLBACK} instead of a trained unit head (explicit opt-in)",
    )
    p.add_argument("--batch-size", type=positive_int, default=32, help="records per batch (one encode, one upsert)")
    p.add_argument("--queue-depth", type=positive_int, default=4, help="batches buffered between stages")
    p.add_argument("--checkpoint-every", type=positive_int, default=4, help="batches between checkpoints")
    p.add_argument(
        "--checkpoint-dir",
        type=Path,
        help=f"checkpoints (default: <store>/_checkpoints, or {DEFAULT_CHECKPOINTS} for a server)",
    )
    p.add_argument("--rejects", type=Path, help="rejects JSONL (default: beside the checkpoint)")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument(
        "--alias",
        help="after a successful job (every shard done), point this alias at the collection, switching searches "
        "that use it in one step",
    )
    p.add_argument("--shard-index", type=non_negative_int, default=0, help="which shard of the input to index")
    p.add_argument("--num-shards", type=positive_int, default=1, help="shards the input is split into (by key hash)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any item was skipped or failed")
    add_json_flag(p, "the report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_encoder_flags(p)
    add_store_flags(p)
    add_collection_flags(p)
    add_logging_flags(p)
    apply_env_defaults(p)
    return p


def _print_report(report: IndexReport) -> None:
    per_kind = ", ".join(f"{k} {v}" for k, v in report.indexed.items()) or "nothing"
    cfg = report.collection_config
    print(
        f"indexed {report.total_indexed} points ({per_kind}) into {report.collection} "
        f"({'created' if report.created else 'existing'}, quantization {cfg.get('quantization')}); "
        f"skipped {report.skipped}, failed {report.failed}; {report.records} records ({report.resumed_from} "
        f"resumed); {report.elapsed_s:.1f} s, {report.rate:.1f} points/s"
    )
    if report.fusion:
        print(f"unit vectors: {report.fusion}")
    if report.rejects_file:
        print(f"rejects listed in {report.rejects_file}")
    if report.alias:
        print(f"alias {report.alias} -> {report.collection}")
    for w in report.warnings:
        print(f"warning: {w}")


def resolve_split(source: Path, source_kind: str, split: str | None) -> str | None:
    """The split to read: `val` by default for datasets, None for `all` and for sources without splits.

    Raises:
        UsageError: A split was given for a manifest or folder source.
    """
    kind = detect_kind(source) if source_kind == "auto" else source_kind
    if kind != "dataset":
        if split is not None:
            raise UsageError(f"--split applies to dataset sources only, and {source} is read as a {kind}")
        return None
    return None if split == "all" else (split or "val")


def resolve_fusion(kinds: tuple[str, ...], bundle: Bundle | None, untrained: bool) -> tuple[UnitEncoder, list[str]]:
    """How unit vectors are made: the bundle's trained head, or `normalize(v+t)` only when asked for explicitly.

    Returns:
        The unit encoder and the warnings to report.

    Raises:
        UsageError: Units are asked for (by default too) without a trained head and without `--untrained-fusion`.
    """
    # "Trained" only when a unit loss with positive weight trained the head; an untrained head is no head.
    trained = bundle is not None and bundle.manifest.serving.unit_provenance == "trained"
    if "unit" not in kinds:
        return UnitEncoder(None), []
    if untrained:
        if bundle is None or not trained:
            return UnitEncoder(None), []
        warning = f"--untrained-fusion: unit vectors are {FALLBACK}, not bundle {bundle.version}'s trained unit head"
        logger.warning(warning)
        return UnitEncoder(None), [warning]
    if bundle is None:
        raise UsageError(
            "unit points need a trained unit head, and the services do not serve one: pass --bundle BUNDLE (a bundle "
            f"with a unit head), --untrained-fusion to make them with {FALLBACK}, or --kinds image,text"
        )
    if not trained:
        raise UsageError(
            f"bundle {bundle.version} has no trained unit head (unit head: {bundle.manifest.serving.unit_provenance}): "
            "pass --untrained-fusion "
            f"to make unit points with {FALLBACK}, or --kinds image,text"
        )
    return UnitEncoder(bundle), []


def main(argv: list[str] | None = None) -> int:
    """`imgtxt index`: returns 0 on success, 1 on errors (or rejects with --strict), 2 on bad usage."""
    parser = index_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.log_json)
    if args.shard_index >= args.num_shards:
        parser.error(f"--shard-index must be < --num-shards ({args.num_shards})")
    store_loc = str(args.store)
    embedded = not (is_url(store_loc) or store_loc == ":memory:" or store_loc.startswith("local:"))
    try:
        refuse_misplaced(args, embedded, store_loc)
        split = resolve_split(args.source, args.source_kind, args.split)
        need_images, need_texts = needs(args.kinds)
        encoder, bundle = build_encoder(args, needs=("image",) * need_images + ("text",) * need_texts)
    except (ValueError, ImgTxtError, OSError, grpc.RpcError) as exc:
        print(f"imgtxt index: error: {exc}", file=sys.stderr)
        return exit_code(exc)
    try:
        fusion, fusion_warnings = resolve_fusion(args.kinds, bundle, args.untrained_fusion)
        config, warnings = collection_config(args, encoder.identity)
    except ValueError as exc:
        encoder.close()
        print(f"imgtxt index: error: {exc}", file=sys.stderr)
        return exit_code(exc)
    store = open_store(store_loc, api_key=args.api_key, timeout=args.store_timeout, retries=args.retries)
    try:
        collection = store.resolve(args.collection or encoder.bundle_version)
        cp_dir = args.checkpoint_dir or (
            Path(store_loc.removeprefix("local:")) / "_checkpoints"
            if embedded or store_loc.startswith("local:")
            else DEFAULT_CHECKPOINTS
        )
        cp = checkpoint_path(cp_dir, collection, args.shard_index, args.num_shards)
        rejects = args.rejects or cp.with_name(f"rejects-{args.shard_index}-of-{args.num_shards}.jsonl")
        # An in-memory store forgets everything at exit: a checkpoint would claim points that no longer exist.
        checkpoint = None if store_loc == ":memory:" else cp
        job = {
            "source": str(args.source.resolve()),
            "fingerprint": source_fingerprint(args.source),
            "split": split,
            "limit": args.limit,
            "shard": [args.shard_index, args.num_shards],
            "fusion": fusion.kind if "unit" in args.kinds else None,
        }
        if args.recreate:
            recreate_collection(store, collection)  # refused while aliases point at it
            shutil.rmtree(cp.parent, ignore_errors=True)  # every shard's progress in the deleted collection
        config = collection_for(store, collection, args, config, encoder.identity)
        records = read_records(args.source, args.source_kind, split, args.limit, args.shard_index, args.num_shards)
        report = run_index(
            records,
            encoder,
            store,
            collection,
            config,
            IndexConfig(
                args.kinds,
                args.batch_size,
                args.queue_depth,
                args.checkpoint_every,
                None if not args.no_progress else False,
            ),
            fusion=fusion,
            checkpoint=checkpoint,
            job=job,
            rejects=rejects,
            restart=args.restart or args.recreate,
        )
        report.warnings = [*warnings, *fusion_warnings]
        failed = args.strict and bool(report.skipped or report.failed)
        if args.alias and not failed:
            pending = unfinished_shards(cp_dir, collection, args.num_shards) if args.num_shards > 1 else []
            if pending:
                report.warnings.append(f"alias {args.alias} not switched yet: shards {pending} are not done")
            else:
                # The job is done with the collection: let go of it first, so a reader in another process that
                # follows the alias can open it at once (the embedded engine lets one process hold a collection).
                store.release(collection)
                store.set_alias(args.alias, collection)
                report.alias = args.alias
    except (CollectionMismatch, ImgTxtError, ValueError, KeyError, OSError, grpc.RpcError) as exc:
        print(f"imgtxt index: error: {exc}", file=sys.stderr)
        return exit_code(exc)
    finally:
        store.close()
        encoder.close()
    emit(args.json, report.to_dict(), lambda: _print_report(report))
    return EXIT_FAILURE if failed else EXIT_OK
