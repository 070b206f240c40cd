"""Server configuration: one frozen dataclass, built from flags and `IMGTXT_*` environment variables."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from imgtxt.config import apply_env_defaults, non_negative_int, positive_int
from imgtxt.connection import KEEPALIVE, Keepalive
from imgtxt.encoders.session import (
    DEVICES,
    OPTIMIZATION_LEVELS,
    PRECISION_CHOICES,
    SessionConfig,
    default_cache_dir,
    expected_provider,
)
from imgtxt.errors import ConfigError
from imgtxt.logs import add_logging_flags
from imgtxt.preprocess import ImageLimits
from imgtxt.serving.tuning import BATCHING_MODES, BatchingPlan, Hardware, plan_batching
from imgtxt.wire import DEFAULT_MAX_MESSAGE_BYTES

DEFAULT_PORTS = {"image": 50051, "text": 50052}


@dataclass(frozen=True)
class ServerConfig:
    """How one encoder service listens, batches, protects itself and shuts down."""

    host: str = "[::]"
    """Address to bind (`127.0.0.1` for loopback only)."""
    port: int = 50051
    """gRPC port; 0 picks a free one (reported on stdout and in `--port-file`)."""
    max_workers: int = 32
    """Threads of the gRPC server's pool (each serves one rpc at a time)."""
    max_concurrent_rpcs: int = 256
    """Rpcs in progress beyond which gRPC answers RESOURCE_EXHAUSTED."""
    max_batch: int = 64
    """Most items per request or stream chunk, and per coalesced session run."""
    batching: str = "auto"
    """`on`: coalesce concurrent requests into session runs; `off`: each request runs alone, in its own thread;
    `auto`: what `imgtxt.serving.tuning.choose_batching` decides for the hardware (adaptive batching: a request that
    finds the service idle runs at once, alone; those arriving while a run is in flight are coalesced)."""
    max_delay_us: int = 2000
    """How long the first request of a batch waits for others to join, in microseconds."""
    batch_workers: int = 0
    """With batching (auto or on): session runs in flight at once, each in its own thread; 0 = 1 on CUDA (one device
    runs one batch at a time, and two would halve the batches), on CPU as many as fit: cores / intra-op threads
    (`imgtxt.serving.tuning.plan_batching`)."""
    max_queue: int = 1024
    """Items waiting for the session beyond which requests are refused with RESOURCE_EXHAUSTED."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Largest gRPC message received or sent."""
    stream_window: int = 2
    """Chunks of one EncodeStream in flight at once (preprocessing of the next overlaps inference of the last)."""
    grace_s: float = 30.0
    """On SIGTERM/SIGINT, how long in-flight rpcs may take to finish."""
    drain_delay_s: float = 5.0
    """On SIGTERM/SIGINT, how long health reports NOT_SERVING (so load balancers move away) before the port closes."""
    tls_cert: Path | None = None
    """PEM certificate chain; with `tls_key`, serve TLS only."""
    tls_key: Path | None = None
    """PEM private key of `tls_cert`."""
    auth_token: str | None = field(default=None, repr=False)
    """Bearer token every rpc but health must carry (`authorization: Bearer <token>`); None = no auth."""
    metrics_port: int | None = None
    """Port of the Prometheus `/metrics` endpoint (0 = a free port, reported in the log, on stdout and in
    `--metrics-port-file`); None = no endpoint. With `auth_token`, scrapes need the same bearer token."""
    metrics_host: str = "127.0.0.1"
    """Address of the metrics endpoint (loopback unless widened: metrics reveal traffic and the served bundle)."""
    keepalive: Keepalive = KEEPALIVE
    """Keepalive pings accepted from clients (the project's clients send `KEEPALIVE`'s)."""

    def __post_init__(self) -> None:
        for name in ("max_workers", "max_concurrent_rpcs", "max_batch", "max_queue", "max_message_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if self.batching not in BATCHING_MODES:
            raise ConfigError(f"batching must be one of {BATCHING_MODES}, got {self.batching!r}")
        if self.batch_workers < 0:
            raise ConfigError(f"batch_workers must be >= 0 (0: automatic), got {self.batch_workers}")
        if self.max_delay_us < 0 or self.grace_s < 0 or self.drain_delay_s < 0 or self.stream_window < 1:
            raise ConfigError("max_delay_us, grace_s and drain_delay_s must be >= 0 and stream_window >= 1")
        if self.max_queue < self.max_batch:
            raise ConfigError(f"max_queue ({self.max_queue}) must be >= max_batch ({self.max_batch})")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key must be given together")
        if self.auth_token is not None and not self.auth_token.strip():
            raise ConfigError("auth_token must not be empty (leave it unset to disable auth)")

    def batching_plan(self, provider: str, tower: str, intra_op_threads: int = 0) -> BatchingPlan:
        """How a service on this host runs its session on `provider` (the execution provider it actually runs on).

        Args:
            provider: The session's active execution provider.
            tower: `image` or `text`.
            intra_op_threads: Threads each of its runs uses (the server passes the session's own); 0 = what
                `session_config_from_args` gives without `--intra-op-threads`.
        """
        return plan_batching(self.batching, Hardware.here(provider, tower), self.batch_workers, intra_op_threads)

    @property
    def tls(self) -> bool:
        """Whether the server listens with TLS."""
        return self.tls_cert is not None


def add_server_flags(parser: argparse.ArgumentParser, modality: str) -> None:
    """Adds every flag of an encoder service (bundle, session, limits, server, logging) to `parser`."""
    d = ServerConfig()
    limits = ImageLimits()
    g = parser.add_argument_group("model")
    g.add_argument("--bundle", type=Path, required=True, help="model bundle directory")
    g.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA if it loads, else CPU; cuda: or fail")
    g.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default="auto",
        help="graph to serve: auto = fp16 on CUDA when the bundle has it, else fp32; a precision the bundle lacks is "
        "a start-up error",
    )
    g.add_argument(
        "--intra-op-threads",
        type=non_negative_int,
        default=0,
        help="ORT intra-op threads (0: cores / batch workers with batching auto or on, cores - 1 with it off)",
    )
    g.add_argument("--inter-op-threads", type=positive_int, default=1, help="ORT inter-op threads")
    g.add_argument("--optimization", choices=tuple(OPTIMIZATION_LEVELS), default="all", help="ORT graph optimisation")
    g.add_argument("--spin", action="store_true", help="let idle ORT threads busy-wait (ORT's default; off here)")
    g.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="optimised-model cache directory")
    g.add_argument("--no-verify", action="store_true", help="skip checking the bundle's file hashes at start")
    if modality == "image":
        g.add_argument("--max-image-bytes", type=positive_int, default=limits.max_image_bytes, help="per image")
        g.add_argument("--max-image-pixels", type=positive_int, default=limits.max_image_pixels, help="per image")
        g.add_argument("--preprocess-threads", type=non_negative_int, default=0, help="decode threads (0: per core)")
    s = parser.add_argument_group("server")
    s.add_argument("--host", default=d.host, help="bind address")
    s.add_argument("--port", type=non_negative_int, default=DEFAULT_PORTS[modality], help="gRPC port (0: free port)")
    s.add_argument("--port-file", type=Path, help="write the bound port to this file once serving")
    s.add_argument("--max-workers", type=positive_int, default=d.max_workers, help="gRPC thread pool size")
    s.add_argument("--max-concurrent-rpcs", type=positive_int, default=d.max_concurrent_rpcs, help="rpcs at once")
    s.add_argument("--max-batch", type=positive_int, default=d.max_batch, help="items per request and per run")
    s.add_argument(
        "--batching",
        choices=BATCHING_MODES,
        default=d.batching,
        help="dynamic batching of concurrent requests; auto: chosen for the hardware (a request finding the service "
        "idle runs at once, alone; those arriving while a run is in flight are coalesced); on: always coalesce; "
        "off: every request alone; on/off override the rule",
    )
    s.add_argument("--max-delay-us", type=non_negative_int, default=d.max_delay_us, help="batch wait, microseconds")
    s.add_argument(
        "--batch-workers",
        type=non_negative_int,
        default=d.batch_workers,
        help="with batching, session runs in flight at once (0: 2 on CPU, or cores / intra-op threads; 1 on CUDA)",
    )
    s.add_argument("--max-queue", type=positive_int, default=d.max_queue, help="queued items before overload")
    s.add_argument("--max-message-bytes", type=positive_int, default=d.max_message_bytes, help="gRPC message limit")
    s.add_argument("--stream-window", type=positive_int, default=d.stream_window, help="stream chunks in flight")
    add_lifecycle_flags(s, d.grace_s, d.drain_delay_s)
    s.add_argument("--tls-cert", type=Path, help="PEM certificate chain (TLS on when given with --tls-key)")
    s.add_argument("--tls-key", type=Path, help="PEM private key")
    s.add_argument("--auth-token", help="required bearer token (prefer the env variable: flags show in `ps`)")
    s.add_argument(
        "--metrics-port",
        type=non_negative_int,
        help="Prometheus /metrics port (0: free port; unset: off); needs --auth-token's token when one is set",
    )
    s.add_argument("--metrics-host", default=d.metrics_host, help="metrics bind address ([::] or 0.0.0.0: every one)")
    s.add_argument("--metrics-port-file", type=Path, help="write the bound metrics port to this file once serving")
    add_logging_flags(parser)
    apply_env_defaults(parser)


def add_lifecycle_flags(group: argparse._ArgumentGroup, grace_s: float, drain_delay_s: float) -> None:
    """`--grace-s` and `--drain-delay-s`: the stop of every gRPC service (`imgtxt.serving.shell.ServerShell.stop`)."""
    group.add_argument(
        "--grace-s",
        type=float,
        default=grace_s,
        help="on SIGTERM, seconds admitted calls get to finish after the drain",
    )
    group.add_argument(
        "--drain-delay-s",
        type=float,
        default=drain_delay_s,
        help="on SIGTERM, seconds health (and readiness) reports NOT_SERVING while calls are still answered (load "
        "balancers and probes move away first), before new calls are refused with UNAVAILABLE (HTTP 503)",
    )


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The server part of parsed flags."""
    return ServerConfig(
        host=args.host,
        port=args.port,
        max_workers=args.max_workers,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_batch=args.max_batch,
        batching=args.batching,
        max_delay_us=args.max_delay_us,
        batch_workers=args.batch_workers,
        max_queue=args.max_queue,
        max_message_bytes=args.max_message_bytes,
        stream_window=args.stream_window,
        grace_s=args.grace_s,
        drain_delay_s=args.drain_delay_s,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        auth_token=args.auth_token,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )


def session_config_from_args(args: argparse.Namespace, tower: str = "text") -> SessionConfig:
    """The ONNX Runtime part of parsed flags.

    The intra-op threads come from the batching plan (`imgtxt.serving.tuning.plan_batching`) for the provider the
    session is expected to run on, unless `--intra-op-threads` is set: with batching on, the batch workers share every
    core (cores / workers each); with it off, each request's run gets cores - 1. On CUDA the intra-op threads only run
    the few operators left on the CPU.

    Args:
        args: Parsed `add_server_flags` flags.
        tower: `image` or `text` (the rule may weigh it).
    """
    hw = Hardware.here(expected_provider(args.device), tower)
    plan = plan_batching(args.batching, hw, args.batch_workers, args.intra_op_threads)
    return SessionConfig(
        device=args.device,
        intra_op_threads=plan.intra_op_threads,
        inter_op_threads=args.inter_op_threads,
        optimization=args.optimization,
        cache_dir=args.cache_dir,
        allow_spinning=args.spin,
    )
