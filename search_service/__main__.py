"""`imgtxt serve-search` / `python -m search_service`: gRPC + HTTP search over an index until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import grpc

from imgtxt.config import apply_env_defaults, non_negative_int, positive_int
from imgtxt.errors import ImgTxtError, exit_code
from imgtxt.flags import HelpFormatter, add_encoder_flags, build_encoder
from imgtxt.logs import add_logging_flags, setup_logging
from imgtxt.serving.config import add_lifecycle_flags
from imgtxt.serving.shell import install_signal_handlers
from search.backend import SearchBackend, SearchLimits
from search_service.server import SearchServerConfig, create_search_server
from store.factory import open_store
from store.options import add_search_flags, add_store_flags, search_options

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Flags of `imgtxt serve-search`."""
    d = SearchServerConfig()
    p = argparse.ArgumentParser(
        prog="imgtxt serve-search",
        description="Serve search over an index: gRPC imgtxt.v1.SearchService, HTTP/JSON (OpenAPI) and a web page.",
        formatter_class=HelpFormatter,
    )
    s = p.add_argument_group("server")
    s.add_argument("--host", default=d.host, help="bind address of both ports")
    s.add_argument("--port", type=non_negative_int, default=d.port, help="gRPC port (0: a free one)")
    s.add_argument("--http-port", type=non_negative_int, default=d.http_port, help="HTTP port (0: a free one)")
    s.add_argument("--port-file", type=Path, help="write 'GRPC_PORT HTTP_PORT' here once serving")
    s.add_argument("--tls-cert", type=Path, help="PEM certificate chain of this server (both ports TLS only)")
    s.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    s.add_argument("--auth-token", help="bearer token required on both protocols (prefer IMGTXT_AUTH_TOKEN)")
    add_lifecycle_flags(s, d.grace_s, d.drain_delay_s)
    s.add_argument("--max-limit", type=positive_int, default=SearchLimits().max_limit, help="most hits per search")
    add_encoder_flags(p)
    add_store_flags(p)
    add_search_flags(p)
    add_logging_flags(p)
    apply_env_defaults(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Serves until SIGTERM/SIGINT; 0 after a clean stop, else `imgtxt.errors.exit_code` of what stopped it."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.log_json)
    try:
        config = SearchServerConfig(
            host=args.host,
            port=args.port,
            http_port=args.http_port,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            auth_token=args.auth_token,
            grace_s=args.grace_s,
            drain_delay_s=args.drain_delay_s,
        )
        encoder, _ = build_encoder(args)
        store = open_store(str(args.store), api_key=args.api_key, timeout=args.store_timeout, retries=args.retries)
        per_item = encoder.limits()  # the encoders' limits are the query limits
        limits = SearchLimits(
            max_limit=args.max_limit,
            max_text_chars=per_item.get("max_text_chars", SearchLimits.max_text_chars),
            max_image_bytes=per_item.get("max_image_bytes", SearchLimits.max_image_bytes),
        )
        backend = SearchBackend(store, encoder, args.collection or encoder.bundle_version, limits, search_options(args))
        server = create_search_server(config, backend)
    except (ImgTxtError, ValueError, KeyError, OSError, grpc.RpcError) as exc:
        print(f"imgtxt serve-search: error: {exc}", file=sys.stderr)
        return exit_code(exc)
    stop = install_signal_handlers()  # before the port is reported: a supervisor may signal at once
    if args.port_file:
        args.port_file.write_text(f"{server.port} {server.http_port}\n")
    print(f"listening on port {server.port} (gRPC) and {server.http_port} (HTTP): {server.url}", flush=True)
    stop.wait()
    server.stop()
    store.close()
    encoder.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
