"""Vector-store, collection and search flags shared by `imgtxt index`, `search`, `eval` and `demo`, and the objects
built from them (the generic flags live in `imgtxt.flags`).
One grammar: a flag means the same thing, with the same type and variable, in every command that has it.
"""

from __future__ import annotations

import argparse
import logging

from imgtxt.bundle import BundleIdentity
from imgtxt.config import positive_int
from imgtxt.flags import default_home
from store.base import FLAGS, QUANTIZATIONS, CollectionConfig, SearchOptions

logger = logging.getLogger(__name__)


DEFAULT_STORE = str(default_home() / "qdrant")
# Collection defaults, shown in --help (the flags default to None: "not given", so a reused collection is checked
# only against what was asked for).
COLLECTION_DEFAULTS = CollectionConfig(dim=1)


def add_store_flags(parser: argparse.ArgumentParser, default: str | None = DEFAULT_STORE) -> None:
    """Which vector store and collection."""
    g = parser.add_argument_group("vector store")
    g.add_argument(
        "--store",
        default=default,
        help="directory (embedded Qdrant), qdrant://host:port or http(s)://... (server), :memory: or local:PATH "
        "(default: $IMGTXT_HOME/qdrant, else $XDG_DATA_HOME/imgtxt/qdrant)",
    )
    g.add_argument("--collection", help="collection or alias name (default: the bundle version)")
    g.add_argument("--api-key", help="Qdrant server API key (prefer the env variable)")
    g.add_argument("--store-timeout", type=float, default=30.0, help="Qdrant server request timeout, seconds")
    g.add_argument("--retries", type=positive_int, default=5, help="attempts on retryable Qdrant errors")


def add_collection_flags(parser: argparse.ArgumentParser) -> None:
    """Collection options: set when a collection is created, checked against it when it exists."""
    d = COLLECTION_DEFAULTS
    g = parser.add_argument_group("collection (set on creation; an existing collection must match)")
    g.add_argument("--hnsw-m", type=positive_int, help=f"HNSW edges per node (default: {d.hnsw_m})")
    g.add_argument(
        "--hnsw-ef-construct", type=positive_int, help=f"HNSW build candidates (default: {d.hnsw_ef_construct})"
    )
    g.add_argument(
        "--full-scan-threshold-kb",
        type=positive_int,
        help="a search whose filter is estimated to match fewer KB of vectors than this (per segment; KB * 1024 / "
        "(4 * dim) vectors) is answered by an exact scan, not the HNSW graph; lower it for the graph to answer "
        f"small filtered sets (default: {d.full_scan_threshold})",
    )
    g.add_argument(
        "--indexing-threshold-kb",
        type=positive_int,
        help="KB of vectors in a segment before its HNSW graph is built (default: the engine's)",
    )
    g.add_argument(
        "--max-segment-size-kb",
        type=positive_int,
        help="embedded engine: KB of vectors per segment; building an index holds one segment's worth of memory, "
        f"not the collection's (default: {d.max_segment_size}, 100k vectors at 512-d; a reopened collection keeps "
        "its own)",
    )
    g.add_argument(
        "--on-disk", action=argparse.BooleanOptionalAction, help="keep original vectors on disk (default: in RAM)"
    )
    g.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        help="vector quantisation, searched with rescoring (default: the bundle's serving.quantization, the mode its "
        "towers were trained for; none without --bundle); a different value overrides the bundle, with a warning",
    )
    g.add_argument("--shards", type=positive_int, help="Qdrant server only: shard_number (default: the server's)")
    g.add_argument(
        "--replication-factor",
        type=positive_int,
        help="Qdrant server only: copies of each shard (default: the server's)",
    )
    g.add_argument(
        "--write-consistency",
        type=positive_int,
        help="Qdrant server only: replicas that must confirm a write (write_consistency_factor; default: the server's)",
    )
    g.add_argument(
        "--recreate",
        action="store_true",
        help="delete the collection, DESTROYING every point in it, and build it anew with these options",
    )


def add_search_flags(parser: argparse.ArgumentParser) -> None:
    """Per-query search options."""
    g = parser.add_argument_group("search")
    g.add_argument("--hnsw-ef", type=positive_int, help="HNSW search candidates (default: the engine's)")
    g.add_argument("--exact", action="store_true", help="exact (brute-force) search")
    g.add_argument("--no-rescore", action="store_true", help="with quantisation: skip rescoring")
    g.add_argument("--oversampling", type=float, help="with quantisation: candidates per result before rescoring")


# Collection option -> its flag's dest (the fields a reused collection is checked on when the flag was given).
_COLLECTION_DESTS = {
    "hnsw_m": "hnsw_m",
    "hnsw_ef_construct": "hnsw_ef_construct",
    "full_scan_threshold": "full_scan_threshold_kb",
    "indexing_threshold": "indexing_threshold_kb",
    "on_disk": "on_disk",
    "quantization": "quantization",
    "shard_number": "shards",
    "replication_factor": "replication_factor",
    "write_consistency_factor": "write_consistency",
}


def given_collection_options(args: argparse.Namespace) -> tuple[str, ...]:
    """The collection options given by flag or variable (a reused collection must have them as given)."""
    return tuple(f for f, dest in _COLLECTION_DESTS.items() if getattr(args, dest, None) is not None)


def collection_config(args: argparse.Namespace, identity: BundleIdentity) -> tuple[CollectionConfig, list[str]]:
    """The collection options from parsed flags, with the bundle's decisions as defaults.

    The bundle's decisions come with its identity, from the bundle itself or from the encoder services' `Info`, so
    a collection indexed through the services follows the bundle as one indexed with `--bundle` does.

    Returns:
        The config, and the warnings to report: every flag that overrides what the bundle decided, and a bundle
        whose trained quantisation the services do not report (servers older than `Info.quantization`).
    """
    warnings = []
    trained = identity.quantization
    if not trained:
        trained = "none"
        if args.quantization is None:
            warnings.append(
                f"the encoder services do not report bundle {identity.version}'s trained quantization (a server "
                "older than Info.quantization): the collection gets quantization none; pass --quantization or --bundle"
            )
    quantization = args.quantization or trained
    if identity.quantization and quantization != trained:
        warnings.append(
            f"--quantization {quantization} overrides bundle {identity.version}'s serving.quantization {trained!r} "
            "(the mode its towers were trained for)"
        )
    for w in warnings:
        logger.warning(w)
    d = COLLECTION_DEFAULTS
    config = CollectionConfig(
        dim=identity.dim,
        hnsw_m=args.hnsw_m or d.hnsw_m,
        hnsw_ef_construct=args.hnsw_ef_construct or d.hnsw_ef_construct,
        full_scan_threshold=args.full_scan_threshold_kb or d.full_scan_threshold,
        indexing_threshold=args.indexing_threshold_kb,
        max_segment_size=args.max_segment_size_kb or d.max_segment_size,
        on_disk=bool(args.on_disk),
        quantization=quantization,
        shard_number=args.shards,
        replication_factor=args.replication_factor,
        write_consistency_factor=args.write_consistency,
    )
    return config, warnings


def refuse_server_only(args: argparse.Namespace, store: str) -> None:
    """Refuses `--shards`, `--replication-factor`, `--write-consistency` (other than 1) for the embedded engine.

    Raises:
        ValueError: One was given, naming it.
    """
    given = [
        f"{flag} {v}"
        for flag, v in (
            ("--shards", args.shards),
            ("--replication-factor", args.replication_factor),
            ("--write-consistency", args.write_consistency),
        )
        if v not in (None, 1)
    ]
    if given:
        raise ValueError(
            f"{', '.join(given)}: the embedded engine (--store {store}) holds a collection in one shard with no "
            "replicas; shards, replication and write consistency need a Qdrant server (--store qdrant://host:6334)"
        )


def check_given(name: str, existing: CollectionConfig, args: argparse.Namespace) -> None:
    """Checks a reused collection against the collection flags that were given (each must match).

    Raises:
        CollectionMismatch: A given flag differs from the collection's option, naming both values.
    """
    from store.base import CollectionMismatch

    given = {f: getattr(args, _COLLECTION_DESTS[f]) for f in given_collection_options(args)}
    diffs = [
        f"{f} {getattr(existing, f)!r}, not {v!r} ({FLAGS[f]})" for f, v in given.items() if getattr(existing, f) != v
    ]
    if diffs:
        raise CollectionMismatch(f"collection {name!r} was built with {'; '.join(diffs)}")


def search_options(args: argparse.Namespace) -> SearchOptions:
    """The search options from parsed flags."""
    return SearchOptions(
        hnsw_ef=args.hnsw_ef, exact=args.exact, rescore=not args.no_rescore, oversampling=args.oversampling
    )
