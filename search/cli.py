"""Entry point `imgtxt search`: one text or image query, printed as ranked hits."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc

from imgtxt.config import apply_env_defaults, positive_int
from imgtxt.errors import ImgTxtError
from imgtxt.logs import add_logging_flags, setup_logging
from indexer.ids import KINDS
from indexer.options import (
    add_encoder_flags,
    add_search_flags,
    add_store_flags,
    build_encoder,
    parse_filters,
    search_options,
)
from indexer.stores.factory import open_store
from search.searcher import Searcher


def search_parser() -> argparse.ArgumentParser:
    """Flags of `imgtxt search`."""
    p = argparse.ArgumentParser(prog="imgtxt search", description="Search the index with a text or an image query.")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="text query")
    q.add_argument("--image", type=Path, help="image file query")
    p.add_argument(
        "--target", choices=KINDS, help="points to search (default: image for text queries, text for images)"
    )
    p.add_argument("--limit", type=positive_int, default=10, help="results")
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE", help="payload filter (repeatable)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    add_encoder_flags(p)
    add_store_flags(p)
    add_search_flags(p)
    add_logging_flags(p)
    apply_env_defaults(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """`imgtxt search`: prints the hits; 0 on success, 1 on errors."""
    args = search_parser().parse_args(argv)
    setup_logging(args.verbose, args.log_json)
    target = args.target or ("image" if args.text is not None else "text")
    try:
        filters = parse_filters(args.filter)
        encoder, _ = build_encoder(args)
    except (ValueError, ImgTxtError, OSError, grpc.RpcError) as exc:
        print(f"imgtxt search: error: {exc}", file=sys.stderr)
        return 2
    store = open_store(str(args.store), api_key=args.api_key, timeout=args.store_timeout, retries=args.retries)
    try:
        searcher = Searcher(store, encoder, args.collection or encoder.bundle_version)
        kw = {"filters": filters, "options": search_options(args)}
        if args.text is not None:
            hits = searcher.search_text(args.text, target, args.limit, **kw)
        else:
            hits = searcher.search_image(args.image, target, args.limit, **kw)
    except (KeyError, ImgTxtError, ValueError, OSError, grpc.RpcError) as exc:
        print(f"imgtxt search: error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
        encoder.close()
    if args.json:
        print(json.dumps([h.to_dict() for h in hits]))
    else:
        for rank, h in enumerate(hits, 1):
            label = h.payload.get("text") or h.payload.get("image_path") or h.payload.get("key")
            print(f"{rank:3d}  {h.score:.4f}  {h.payload.get('kind', '?'):5s}  {label}")
    return 0
