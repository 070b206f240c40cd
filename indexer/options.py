"""Flags shared by `imgtxt index`, `imgtxt search` and `imgtxt eval --via-index`, and the objects built from them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from imgtxt.bundle import Bundle, load_bundle
from imgtxt.client import ServiceEncoder
from imgtxt.config import positive_int
from imgtxt.encoders.bundle import BundleEncoder
from imgtxt.encoders.session import SessionConfig, default_cache_dir
from imgtxt.encoders.types import Encoder
from indexer.stores.base import QUANTIZATIONS, CollectionConfig, SearchOptions

DEFAULT_STORE = "artifacts/qdrant"


def add_encoder_flags(parser: argparse.ArgumentParser) -> None:
    """Where embeddings come from: the gRPC services (default) or ONNX Runtime in-process."""
    g = parser.add_argument_group("encoders")
    g.add_argument("--bundle", type=Path, help="model bundle (needed for --in-process and the trained unit head)")
    g.add_argument("--in-process", action="store_true", help="run the ONNX towers here instead of calling services")
    g.add_argument("--image-service", default="localhost:50051", help="image encoder service host:port")
    g.add_argument("--text-service", default="localhost:50052", help="text encoder service host:port")
    g.add_argument("--token", help="bearer token of the services (prefer the env variable)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="in-process ORT device")
    g.add_argument("--rpc-timeout", type=float, default=30.0, help="deadline of unary service calls, seconds")


def add_store_flags(parser: argparse.ArgumentParser) -> None:
    """Which vector store and collection."""
    g = parser.add_argument_group("vector store")
    g.add_argument(
        "--store",
        default=DEFAULT_STORE,
        help="directory (embedded Qdrant), qdrant://host:port or http(s)://... (server), :memory: or local:PATH",
    )
    g.add_argument("--collection", help="collection name (default: the bundle version)")
    g.add_argument("--api-key", help="Qdrant server API key (prefer the env variable)")
    g.add_argument("--store-timeout", type=float, default=30.0, help="Qdrant server request timeout, seconds")
    g.add_argument("--retries", type=positive_int, default=5, help="attempts on retryable Qdrant errors")


def add_collection_flags(parser: argparse.ArgumentParser) -> None:
    """Collection creation options."""
    g = parser.add_argument_group("collection (on creation)")
    g.add_argument("--hnsw-m", type=positive_int, default=16, help="HNSW edges per node")
    g.add_argument("--hnsw-ef-construct", type=positive_int, default=100, help="HNSW build candidates")
    g.add_argument("--indexing-threshold-kb", type=positive_int, help="segment size (KB) before HNSW is built")
    g.add_argument("--on-disk", action="store_true", help="keep original vectors on disk (mmap)")
    g.add_argument("--quantization", choices=QUANTIZATIONS, default="none", help="int8 / binary, with rescoring")


def add_search_flags(parser: argparse.ArgumentParser) -> None:
    """Per-query search options."""
    g = parser.add_argument_group("search")
    g.add_argument("--hnsw-ef", type=positive_int, help="HNSW search candidates")
    g.add_argument("--exact", action="store_true", help="exact (brute-force) search")
    g.add_argument("--no-rescore", action="store_true", help="with quantisation: skip rescoring")
    g.add_argument("--oversampling", type=float, help="with quantisation: candidates per result before rescoring")


def collection_config(args: argparse.Namespace, dim: int) -> CollectionConfig:
    """The collection options from parsed flags."""
    return CollectionConfig(
        dim=dim,
        hnsw_m=args.hnsw_m,
        hnsw_ef_construct=args.hnsw_ef_construct,
        indexing_threshold=args.indexing_threshold_kb,
        on_disk=args.on_disk,
        quantization=args.quantization,
    )


def search_options(args: argparse.Namespace) -> SearchOptions:
    """The search options from parsed flags."""
    return SearchOptions(
        hnsw_ef=args.hnsw_ef, exact=args.exact, rescore=not args.no_rescore, oversampling=args.oversampling
    )


def build_encoder(args: argparse.Namespace) -> tuple[Encoder, Bundle | None]:
    """The encoder the flags ask for, and the bundle when one was named.

    Raises:
        ValueError: `--in-process` without `--bundle`, or services serving another bundle than `--bundle`.
    """
    bundle = load_bundle(args.bundle) if args.bundle else None
    if args.in_process:
        if bundle is None:
            raise ValueError("--in-process needs --bundle")
        return BundleEncoder.from_bundle(
            bundle, SessionConfig(device=args.device, cache_dir=default_cache_dir())
        ), bundle
    encoder = ServiceEncoder(args.image_service, args.text_service, token=args.token, timeout=args.rpc_timeout)
    if bundle is not None and bundle.version != encoder.bundle_version:
        encoder.close()
        raise ValueError(f"the services serve bundle {encoder.bundle_version}, not --bundle {bundle.version}")
    return encoder, bundle


def parse_filters(items: list[str]) -> dict[str, Any]:
    """`key=value` payload filters; a value that parses as a JSON number or boolean is matched as one."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"filter must be key=value, got {item!r}")
        try:
            value = json.loads(raw)
            out[key] = value if isinstance(value, bool | int) else raw
        except json.JSONDecodeError:
            out[key] = raw
    return out
