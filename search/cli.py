"""Entry point `imgtxt search`: one text or image query, printed as ranked hits."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from imgtxt.config import apply_env_defaults, positive_int
from imgtxt.errors import ImgTxtError, exit_code
from imgtxt.flags import HelpFormatter, add_encoder_flags, add_filter_flag, add_json_flag, build_encoder, emit
from imgtxt.logs import add_logging_flags, setup_logging
from search.searcher import Searcher
from store.base import Hit
from store.factory import open_store
from store.ids import KINDS
from store.options import add_search_flags, add_store_flags, search_options


def search_parser() -> argparse.ArgumentParser:
    """Flags of `imgtxt search`."""
    p = argparse.ArgumentParser(
        prog="imgtxt search",
        description="Search the index with a text or an image query.",
        formatter_class=HelpFormatter,
    )
    q = p.add_argument_group("query (one of)")
    q.add_argument("--text", help="text query")
    q.add_argument("--image", type=Path, help="image file query")
    p.add_argument(
        "--target", choices=KINDS, help="points to search (default: image for text queries, text for images)"
    )
    p.add_argument("--top-k", type=positive_int, default=10, help="results to return")
    add_filter_flag(p)
    add_json_flag(p, "the hits")
    add_encoder_flags(p)
    add_store_flags(p)
    add_search_flags(p)
    add_logging_flags(p)
    apply_env_defaults(p)
    return p


def _print_hits(hits: list[Hit]) -> None:
    for rank, h in enumerate(hits, 1):
        label = h.payload.get("text") or h.payload.get("image_path") or h.payload.get("key")
        print(f"{rank:3d}  {h.score:.4f}  {h.payload.get('kind', '?'):5s}  {label}")


def main(argv: list[str] | None = None) -> int:
    """`imgtxt search`: prints the hits; 0 on success, 1 on errors, 2 on bad usage."""
    parser = search_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.log_json)
    # Not an argparse mutually exclusive group: that would refuse a query given by IMGTXT_TEXT / IMGTXT_IMAGE.
    if (args.text is None) == (args.image is None):
        parser.error("give exactly one query: --text TEXT or --image PATH")
    target = args.target or ("image" if args.text is not None else "text")
    try:
        encoder, _ = build_encoder(args, needs=("text",) if args.text is not None else ("image",))
    except (ValueError, ImgTxtError, OSError, grpc.RpcError) as exc:
        print(f"imgtxt search: error: {exc}", file=sys.stderr)
        return exit_code(exc)
    store = open_store(str(args.store), api_key=args.api_key, timeout=args.store_timeout, retries=args.retries)
    try:
        searcher = Searcher(store, encoder, args.collection or encoder.bundle_version)
        kw = {"filters": args.filter, "options": search_options(args)}
        if args.text is not None:
            hits = searcher.search_text(args.text, target, args.top_k, **kw)
        else:
            hits = searcher.search_image(args.image, target, args.top_k, **kw)
    except (KeyError, ImgTxtError, ValueError, OSError, grpc.RpcError) as exc:
        print(f"imgtxt search: error: {exc}", file=sys.stderr)
        return exit_code(exc)
    finally:
        store.close()
        encoder.close()
    emit(args.json, [h.to_dict() for h in hits], lambda: _print_hits(hits))
    return 0
