"""Vector-store, collection and search flags shared by `imgtxt index`, `search`, `eval` and `demo`, and the objects
built from them (the generic flags live in `imgtxt.flags`).
One grammar: a flag means the same thing, with the same type and variable, in every command that has it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any

from imgtxt.bundle import BundleIdentity
from imgtxt.config import env_name, positive_int
from imgtxt.flags import default_home
from store.base import (
    COLLECTION_OPTIONS,
    EMBEDDED,
    OPTIONS_BY_FIELD,
    SERVER,
    CollectionConfig,
    CollectionMismatch,
    CollectionOption,
    SearchOptions,
    VectorStore,
)
from store.identity import check_identity

logger = logging.getLogger(__name__)


DEFAULT_STORE = str(default_home() / "qdrant")


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


RECREATE_HELP = (
    "delete the collection, DESTROYING every point in it, and build it anew with these options; refused while "
    "aliases point at it (index into a new collection with --alias instead: the alias moves in one step)"
)


def add_collection_flags(parser: argparse.ArgumentParser) -> None:
    """Collection options, generated from `store.base.COLLECTION_OPTIONS`: set when a collection is created; given
    for an existing collection, each must match it (it cannot take effect there)."""
    g = parser.add_argument_group("collection (set on creation; given for an existing collection, must match it)")
    for o in COLLECTION_OPTIONS:
        where = {SERVER: "Qdrant server only: ", EMBEDDED: "embedded engine only: "}.get(o.applies, "")
        text = f"{where}{o.help} (default: {o.default})"
        if o.kind == "bool":
            g.add_argument(o.flag, dest=o.dest, action=argparse.BooleanOptionalAction, help=text)
        elif o.kind == "choice":
            g.add_argument(o.flag, dest=o.dest, choices=o.choices, help=text)
        else:
            g.add_argument(o.flag, dest=o.dest, type=positive_int, help=text)
    g.add_argument("--recreate", action="store_true", help=RECREATE_HELP)


def add_search_flags(parser: argparse.ArgumentParser) -> None:
    """Per-query search options."""
    g = parser.add_argument_group("search")
    g.add_argument("--hnsw-ef", type=positive_int, help="HNSW search candidates (default: the engine's)")
    g.add_argument("--exact", action="store_true", help="exact (brute-force) search")
    g.add_argument("--no-rescore", action="store_true", help="with quantisation: skip rescoring")
    g.add_argument("--oversampling", type=float, help="with quantisation: candidates per result before rescoring")


def given_collection_options(args: argparse.Namespace) -> dict[str, Any]:
    """The collection options given by flag or variable, by `CollectionConfig` field."""
    return {o.field: getattr(args, o.dest) for o in COLLECTION_OPTIONS if getattr(args, o.dest, None) is not None}


def collection_config(args: argparse.Namespace, identity: BundleIdentity) -> tuple[CollectionConfig, list[str]]:
    """The options of a collection to create, from parsed flags, with the bundle's decisions as defaults.

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
    given = given_collection_options(args)
    quantization = str(given.get("quantization", trained))
    if identity.quantization and quantization != trained:
        warnings.append(
            f"--quantization {quantization} overrides bundle {identity.version}'s serving.quantization {trained!r} "
            "(the mode its towers were trained for)"
        )
    for w in warnings:
        logger.warning(w)
    return CollectionConfig(**{**given, "dim": identity.dim, "quantization": quantization}), warnings


def refuse_misplaced(args: argparse.Namespace, embedded: bool, store: str) -> None:
    """Refuses options given for a backend they do not apply to: server-only ones (other than 1) for the embedded
    engine, embedded-only ones for a server.

    Raises:
        ValueError: One was given, naming it.
    """
    given = given_collection_options(args)
    if embedded:
        wrong = [
            f"{OPTIONS_BY_FIELD[f].flag} {v}"
            for f, v in given.items()
            if OPTIONS_BY_FIELD[f].applies == SERVER and v != 1
        ]
        if wrong:
            raise ValueError(
                f"{', '.join(wrong)}: the embedded engine (--store {store}) holds a collection in one shard with no "
                "replicas; shards, replication and write consistency need a Qdrant server (--store qdrant://host:6334)"
            )
        return
    wrong = [f"{OPTIONS_BY_FIELD[f].flag} {v}" for f, v in given.items() if OPTIONS_BY_FIELD[f].applies == EMBEDDED]
    if wrong:
        raise ValueError(
            f"{', '.join(wrong)}: applies to the embedded engine only; a Qdrant server (--store {store}) sizes its own "
            "segments"
        )


def check_given(name: str, existing: CollectionConfig, args: argparse.Namespace) -> None:
    """Checks an existing collection against every collection option that was given: none can take effect on an
    existing collection, so each must match it (an option not given takes the collection's own value).

    Raises:
        CollectionMismatch: A given option differs from the collection's, naming the flag and both values.
    """
    diffs = [
        f"{f} {getattr(existing, f)!r}, not the given {v!r} ({OPTIONS_BY_FIELD[f].flag})"
        for f, v in given_collection_options(args).items()
        if getattr(existing, f) != v
    ]
    if diffs:
        raise CollectionMismatch(
            f"collection {name!r} exists with {'; '.join(diffs)}: options cannot change on an existing collection; "
            "index into another --collection, drop the flag, or pass --recreate to delete it (and every point in it) "
            "and rebuild it"
        )


def collection_for(
    store: VectorStore, name: str, args: argparse.Namespace, create: CollectionConfig, identity: BundleIdentity
) -> CollectionConfig:
    """The config to write collection `name` with: for an existing collection its own options (after checking that
    `identity` is the bundle that wrote it, then the given options against it, `check_given`), else `create` (from
    `collection_config`).

    Raises:
        BundleMismatch: Another bundle wrote the existing collection (named before any option).
        CollectionMismatch: A given option differs from the existing collection's.
    """
    try:
        existing = store.collection_config(name)
    except KeyError:
        return create
    if existing.dim == identity.dim:  # another dimension: the store's own check names both dimensions
        check_identity(store.resolve(name), store.collection_identity(name), identity, "write")
    check_given(name, existing, args)
    # The dimension is the bundle's: a collection of another dimension is refused by the store, naming both.
    return dataclasses.replace(existing, dim=create.dim)


def recreate_collection(store: VectorStore, name: str) -> None:
    """Deletes collection `name` (`--recreate`) so it can be built anew, refusing while aliases point at it: an alias
    would otherwise serve a collection being rebuilt (or, after a rebuild by another bundle, another space).

    Raises:
        CollectionMismatch: Aliases point at the collection, naming them.
    """
    aliases = store.aliases_of(name)
    if aliases:
        raise CollectionMismatch(
            f"--recreate refused: alias(es) {', '.join(aliases)} point at collection {store.resolve(name)!r}, and "
            "deleting it would leave them serving a collection being rebuilt; index into a new collection with "
            "--alias ALIAS instead (the alias moves in one step once the job is done)"
        )
    logger.warning("--recreate: deleting collection %s and every point in it", name)
    store.delete_collection(name)


def _value(o: CollectionOption) -> str:
    if o.kind == "choice":
        return " \\| ".join(o.choices)
    return "on / off" if o.kind == "bool" else "KB" if o.flag.endswith("-kb") else "N"


def options_table() -> str:
    """The docs table of the collection options (docs/indexing-and-search.md embeds it; a test compares them)."""
    rows = [
        "| flag | value | variable | option | default | applies to | on an existing collection |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in COLLECTION_OPTIONS:
        reopen = "checked on every reopen; if given, must match" if o.search_checked else "if given, must match"
        rows.append(
            f"| `{o.flag}` | {_value(o)} | `{env_name(o.flag)}` | `{o.field}` | {o.default} | {o.applies} | {reopen} |"
        )
    return "\n".join(rows) + "\n"


def search_options(args: argparse.Namespace) -> SearchOptions:
    """The search options from parsed flags."""
    return SearchOptions(
        hnsw_ef=args.hnsw_ef, exact=args.exact, rescore=not args.no_rescore, oversampling=args.oversampling
    )
