"""The one gRPC server shell every service of the project runs in: bind, interceptors, health, reflection, admission
gate, drain, stop, signals, and the bearer-token checker both protocols use.

The encoder services (`imgtxt.serving.server`) and the search service (`search_service.server`, which also stops its
HTTP side through the shell's `on_stop` hooks and shares its gate) differ only in what they register; how they start,
report health and stop is written once, here.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from imgtxt.connection import KEEPALIVE, Keepalive
from imgtxt.errors import ConfigError
from imgtxt.serving.auth import token_checker
from imgtxt.serving.interceptors import AdmissionGate, AuthInterceptor, ErrorMappingInterceptor, RequestCheckInterceptor

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class Lifecycle:
    """How a server stops: the four steps of `ServerShell.stop` and their durations."""

    grace_s: float = 30.0
    """After the drain, how long admitted rpcs and requests may take to finish."""
    drain_delay_s: float = 5.0
    """How long health reports NOT_SERVING, while everything is still answered, before new calls are refused."""

    def __post_init__(self) -> None:
        if self.grace_s < 0 or self.drain_delay_s < 0:
            raise ConfigError(f"grace_s and drain_delay_s must be >= 0, got {self.grace_s} and {self.drain_delay_s}")


class HealthServicer(health.HealthServicer):
    """gRPC's health servicer, whose `Watch` streams a stopping server can end.

    An open `Watch` is an rpc in flight: left open, a watcher that does not hang up when the server says goodbye (a
    probe, a monitoring script, `grpcurl`) holds the server up for the whole grace period, then gets CANCELLED.
    """

    def __init__(self) -> None:
        super().__init__(experimental_non_blocking=True)
        self._watches: set[Any] = set()
        self._watches_lock = threading.Lock()
        self._ended = False

    def Watch(self, request: Any, context: Any, send_response_callback: Any = None) -> Any:
        """Streams the service's status on every change (the first answer is the current status)."""
        watcher = super().Watch(request, context, send_response_callback)
        if watcher is None:  # non-blocking mode: the stream is driven by callbacks, not ended from here
            return None
        with self._watches_lock:
            if self._ended:
                watcher.close()
            self._watches.add(watcher)
        context.add_callback(lambda: self._forget(watcher))
        return watcher

    def _forget(self, watcher: Any) -> None:
        with self._watches_lock:
            self._watches.discard(watcher)

    def end_watches(self) -> None:
        """Ends every open `Watch` stream after the status it has sent (NOT_SERVING), and any opened later."""
        with self._watches_lock:
            self._ended = True
            watches = list(self._watches)
        for watcher in watches:
            watcher.close()


def bind(server: grpc.Server, host: str, port: int, tls_cert: Path | None, tls_key: Path | None) -> int:
    """Binds `host:port` (TLS-only when a certificate and key are given) and returns the bound port.

    Raises:
        ConfigError: The address cannot be bound, or the TLS files are unreadable.
    """
    address = f"{host}:{port}"
    try:
        if tls_cert is not None and tls_key is not None:
            creds = grpc.ssl_server_credentials([(tls_key.read_bytes(), tls_cert.read_bytes())])
            bound = server.add_secure_port(address, creds)
        else:
            bound = server.add_insecure_port(address)
    except (OSError, RuntimeError) as exc:
        raise ConfigError(f"cannot listen on {address}: {exc}") from exc
    if bound == 0:
        raise ConfigError(f"cannot listen on {address} (address in use or not available)")
    return int(bound)


@dataclass(frozen=True)
class ShellConfig:
    """Where a gRPC server listens and how it protects itself and stops (the part every service shares)."""

    host: str
    """Address to bind."""
    port: int
    """Port (0: a free one)."""
    max_workers: int
    """Threads of the server's pool."""
    lifecycle: Lifecycle = Lifecycle()
    """Drain and grace of `stop`."""
    tls_cert: Path | None = None
    """PEM certificate chain: TLS only."""
    tls_key: Path | None = None
    """PEM private key of `tls_cert`."""
    auth_token: str | None = field(default=None, repr=False)
    """Bearer token every rpc but health must carry; None = no auth."""
    max_concurrent_rpcs: int | None = None
    """Rpcs in progress beyond which gRPC answers RESOURCE_EXHAUSTED (None: no limit)."""
    max_message_bytes: int | None = None
    """Largest message received or sent (None: gRPC's defaults)."""
    keepalive: Keepalive = KEEPALIVE
    """The keepalive pings this server accepts, declared once with what the project's clients send."""


class ServerShell:
    """One gRPC server and its lifecycle; built NOT_SERVING and not started.

    Interceptors, outermost first: the error mapping, the admission gate, the token check (with a token), then the
    request check, so a caller without a token learns that first, whatever it sent.

    Args:
        config: Address, TLS, auth, limits, lifecycle.
        service_name: Full proto name of the served service (health and reflection).
        register: Adds the service's servicer(s) to the `grpc.Server`.
        metrics: The service's metrics, read by the error-mapping interceptor (`requests`, `errors`,
            `request_seconds`, `labels`).
        thread_name_prefix: Names of the pool's threads.

    Raises:
        ConfigError: The port could not be bound, or the TLS files are unreadable.
    """

    def __init__(
        self,
        config: ShellConfig,
        service_name: str,
        register: Callable[[grpc.Server], None],
        metrics: Any,
        thread_name_prefix: str = "grpc",
    ) -> None:
        self.config = config
        self.service_name = service_name
        self.tokens = token_checker(config.auth_token)
        self.gate = AdmissionGate()
        interceptors: list[grpc.ServerInterceptor] = [ErrorMappingInterceptor(metrics), self.gate]
        if self.tokens is not None:
            interceptors.append(AuthInterceptor(self.tokens))
        interceptors.append(RequestCheckInterceptor())
        options: list[tuple[str, Any]] = [("grpc.so_reuseport", 0), *config.keepalive.server_options()]
        if config.max_message_bytes is not None:
            options += [
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
            ]
        self.server = grpc.server(
            ThreadPoolExecutor(config.max_workers, thread_name_prefix=thread_name_prefix),
            interceptors=interceptors,
            options=options,
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        register(self.server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = bind(self.server, config.host, config.port, config.tls_cert, config.tls_key)
        self.on_stop: list[Callable[[], None]] = []
        """Run in order after gRPC's stop (batchers, HTTP servers, metrics endpoints)."""
        self._serving = False
        self._stopped = False
        self.set_serving(False)

    @property
    def serving(self) -> bool:
        """Whether health says SERVING (False from the drain on)."""
        return self._serving

    def start(self) -> None:
        """Starts answering (health stays as it is: NOT_SERVING until `set_serving(True)`)."""
        self.server.start()
        logger.info(
            "listening",
            extra={
                "service": self.service_name,
                "address": f"{self.config.host}:{self.config.port}",
                "port": self.port,
                "tls": self.config.tls_cert is not None,
                "auth": self.tokens is not None,
            },
        )

    def set_serving(self, serving: bool) -> None:
        """Sets the health status of the server and of its service."""
        self._serving = serving
        status = SERVING if serving else NOT_SERVING
        for name in ("", self.service_name):
            self.health.set(name, status)

    def drain(self) -> None:
        """Reports NOT_SERVING (load balancers and probes move away) while rpcs keep being answered."""
        self._serving = False
        self.health.enter_graceful_shutdown()
        logger.info("draining", extra={"service": self.service_name})

    def stop(self, grace: float | None = None) -> None:
        """Stops in four steps, so that no call a client sent is lost and every refused one is retryable:

        1. drain: health says NOT_SERVING, calls are still answered for `drain_delay_s` (load balancers, probes and
           readiness checks move away);
        2. refuse: new calls get UNAVAILABLE (gRPC) or 503 (HTTP, through the same gate), health `Watch` streams
           end, admitted calls (streams included) get up to `grace` seconds to finish;
        3. gRPC's own stop with what is left of the grace: the port closes, anything still running is cancelled;
        4. the `on_stop` hooks, in order (the batcher runs what is queued; an HTTP server closes).

        gRPC's own stop answers CANCELLED to calls it has accepted but not yet handed to a handler
        (grpc/grpc#41785, a core bug); the project's clients retry that CANCELLED like UNAVAILABLE (see
        `imgtxt.connection.RETRIED_CODES`), so they see the retryable UNAVAILABLE of a stopped server instead.

        Args:
            grace: Seconds admitted calls get after the drain (default `grace_s`; 0: stop now — no drain, in-flight
                calls cancelled at once, as a test or a second SIGTERM wants).
        """
        if self._stopped:
            return
        self._stopped = True
        lifecycle = self.config.lifecycle
        grace = lifecycle.grace_s if grace is None else grace
        self.drain()
        if lifecycle.drain_delay_s and grace > 0:
            time.sleep(lifecycle.drain_delay_s)  # operational delay for load balancers to notice, not sync
        deadline = time.monotonic() + grace
        self.gate.close()
        self.health.end_watches()
        if not self.gate.wait_idle(grace):
            logger.warning("grace period over: cancelling %d calls", self.gate.active)
        self.server.stop(max(0.0, deadline - time.monotonic())).wait()
        for hook in self.on_stop:
            hook()
        logger.info("stopped", extra={"service": self.service_name})


def install_signal_handlers() -> threading.Event:
    """Makes SIGTERM and SIGINT set the returned event (call from the main thread); a second one exits at once.

    The first signal starts the graceful stop (the caller waits on the event, then calls `stop()`); a second means
    the operator does not want to wait for the grace period: the process exits 1 without it. For a service's own
    process (`imgtxt serve-*`); a process that owns more (children to clean up) uses `wait_for_signal`.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            logger.error("received %s again: exiting without waiting", name)
            os._exit(1)
        logger.warning("received %s: shutting down", name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def wait_for_signal() -> str:
    """Blocks until SIGTERM or SIGINT (call from the main thread), then puts the previous handlers back.

    For a process that runs a server among other things (`imgtxt demo`): a second signal during the stop gets the
    process's own handling (Ctrl-C: KeyboardInterrupt, so its clean-up still runs).

    Returns:
        The signal's name.
    """
    received: list[str] = []
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.warning("received %s: shutting down", received[0])
    return received[0]
