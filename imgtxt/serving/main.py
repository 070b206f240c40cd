"""The shared `main()` of both services: flags -> load -> serve -> warm up -> SERVING -> wait -> graceful shutdown."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from imgtxt.bundle import load_bundle
from imgtxt.config import HelpFormatter
from imgtxt.encoders.tower import TowerEncoder
from imgtxt.errors import EXIT_FAILURE, EXIT_OK, BundleError, ConfigError, fail
from imgtxt.logs import setup_logging
from imgtxt.serving.config import add_server_flags, server_config_from_args, session_config_from_args
from imgtxt.serving.server import EncoderServer
from imgtxt.serving.shell import install_signal_handlers

logger = logging.getLogger(__name__)


def run_service(
    argv: list[str] | None,
    *,
    encoder_class: type[TowerEncoder[Any, Any]],
    create_server: Callable[[Any, Any], EncoderServer],
    encoder_options: Callable[[argparse.Namespace], dict[str, Any]] = lambda args: {},
) -> int:
    """Runs one encoder service until SIGTERM/SIGINT, then drains and exits 0.

    Prints `listening on port N` on stdout once SERVING (and writes N to `--port-file`), so a supervisor or a test
    that passed `--port 0` learns the port.

    Args:
        argv: Command-line arguments (default `sys.argv[1:]`).
        encoder_class: `ImageEncoder` or `TextEncoder`.
        create_server: The service's `create_server(config, encoder)`.
        encoder_options: Modality-specific encoder constructor arguments from the parsed flags.

    Returns:
        0 after a graceful shutdown; 2 when the configuration, bundle or device is unusable; 1 when warm-up fails
        (`imgtxt.errors.exit_code`).
    """
    modality = encoder_class.modality
    parser = argparse.ArgumentParser(
        prog=f"imgtxt serve-{modality}",
        description=f"Serve the {modality} tower of a model bundle over gRPC (imgtxt.v1).",
        formatter_class=HelpFormatter,
    )
    add_server_flags(parser, modality)
    args = parser.parse_args(argv)
    # int(): IMGTXT_VERBOSE arrives as a string (apply_env_defaults leaves count options unconverted).
    setup_logging(args.verbose, args.log_json)
    try:
        config = server_config_from_args(args)
        session_config = session_config_from_args(args, modality)
        logger.info(
            "configuration",
            extra={
                "server": dataclasses.asdict(config) | {"auth_token": "***" if config.auth_token else None},
                "session": dataclasses.asdict(session_config),
            },
        )
        bundle = load_bundle(args.bundle, verify=not args.no_verify)
        encoder = encoder_class.from_session_config(bundle, session_config, args.precision, **encoder_options(args))
        server = create_server(config, encoder)
    except (BundleError, ConfigError) as exc:
        return fail(f"imgtxt serve-{modality}", exc)
    stop = install_signal_handlers()
    try:
        server.warm_up()
    except Exception:
        logger.exception("warm-up failed")
        server.stop(grace=0)
        return EXIT_FAILURE
    if args.port_file:
        args.port_file.write_text(f"{server.port}\n")
    print(f"listening on port {server.port}", flush=True)
    if server.metrics_port is not None:
        if args.metrics_port_file:
            args.metrics_port_file.write_text(f"{server.metrics_port}\n")
        print(f"metrics on port {server.metrics_port}", flush=True)
    stop.wait()
    server.stop()
    encoder.close()
    return EXIT_OK
