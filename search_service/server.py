"""One search process: the gRPC `SearchService` and the HTTP app (uvicorn, in a thread) over one backend.

Same operations as the encoder services: health and reflection on the gRPC port, error mapping and bearer-token auth
by the same interceptors, TLS on both ports from one certificate, Prometheus metrics at `GET /metrics`.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from imgtxt.errors import ConfigError
from imgtxt.serving.interceptors import AuthInterceptor, ErrorMappingInterceptor
from imgtxt.serving.server import bind
from imgtxt.v1 import search_pb2 as pb
from imgtxt.v1 import search_pb2_grpc as pb_grpc
from search.backend import SearchBackend
from search_service.prometheus import SearchMetrics
from search_service.servicer import SearchServicer
from search_service.web import create_app

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SearchService"].full_name


@dataclass(frozen=True)
class SearchServerConfig:
    """Where and how the search service listens."""

    host: str = "127.0.0.1"
    """Address of both ports."""
    port: int = 50053
    """gRPC port (0: a free one)."""
    http_port: int = 8080
    """HTTP port of the JSON API and the page (0: a free one)."""
    max_workers: int = 16
    """Threads of the gRPC server."""
    tls_cert: Path | None = None
    """PEM certificate chain: both ports serve TLS only."""
    tls_key: Path | None = None
    """PEM private key of `tls_cert`."""
    auth_token: str | None = field(default=None, repr=False)
    """Bearer token every rpc and HTTP route but health must carry."""
    grace_s: float = 10.0
    """On stop, how long in-flight requests may take."""

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key must be given together")
        for name in ("port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(f"{name} must be in 0..65535, got {getattr(self, name)}")


@dataclass
class SearchServer:
    """A started search process: gRPC server, HTTP server thread, and what they share."""

    grpc_server: grpc.Server
    """The gRPC server (started)."""
    port: int
    """Bound gRPC port."""
    http_port: int
    """Bound HTTP port."""
    backend: SearchBackend
    """The domain object both protocols call."""
    metrics: SearchMetrics
    """Metrics of both protocols."""
    health: health.HealthServicer
    """Health servicer."""
    host: str = "127.0.0.1"
    """The address both ports are bound to."""
    _http: Any = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The page's URL."""
        scheme = "https" if self._http is not None and self._http.config.ssl_certfile else "http"
        return f"{scheme}://{self.host}:{self.http_port}/"

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, then stops both servers (in-flight requests get `grace` seconds)."""
        self.health.enter_graceful_shutdown()
        if self._http is not None:
            self._http.should_exit = True
        self.grpc_server.stop(grace if grace is not None else 10.0).wait()
        if self._thread is not None:
            self._thread.join(30)
        logger.info("search service stopped")


def wait_for_signal() -> str:
    """Blocks until SIGTERM or SIGINT (Ctrl-C) and returns the signal's name (call from the main thread)."""
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


def _bind_http(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} (HTTP): {exc}") from exc
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts: ready as soon as this returns
    return sock


def create_search_server(config: SearchServerConfig, backend: SearchBackend) -> SearchServer:
    """Builds and starts both servers without blocking; health is SERVING once this returns.

    Raises:
        ConfigError: A port could not be bound, or the TLS files are unreadable.
    """
    metrics = SearchMetrics()
    interceptors: list[grpc.ServerInterceptor] = [ErrorMappingInterceptor(metrics)]  # type: ignore[arg-type]
    if config.auth_token:
        interceptors.append(AuthInterceptor(config.auth_token))
    server = grpc.server(
        ThreadPoolExecutor(config.max_workers, thread_name_prefix="search-grpc"),
        interceptors=interceptors,
        options=[("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_SearchServiceServicer_to_server(SearchServicer(backend), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = bind(server, config.host, config.port, config.tls_cert, config.tls_key)
    sock = _bind_http(config.host, config.http_port)
    app = create_app(backend, metrics, config.auth_token)
    http = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            ssl_certfile=str(config.tls_cert) if config.tls_cert else None,
            ssl_keyfile=str(config.tls_key) if config.tls_key else None,
            timeout_graceful_shutdown=int(config.grace_s),
        )
    )
    thread = threading.Thread(target=http.run, kwargs={"sockets": [sock]}, name="search-http", daemon=True)
    server.start()
    thread.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    out = SearchServer(
        server, port, sock.getsockname()[1], backend, metrics, health_servicer, config.host, http, thread
    )
    logger.info(
        "search service listening",
        extra={
            "grpc_port": port,
            "http_port": out.http_port,
            "collection": backend.collection,
            "tls": bool(config.tls_cert),
        },
    )
    return out
