"""One search process: the gRPC `SearchService` and the HTTP app (uvicorn, in a thread) over one backend.

Both run in the one server shell of the project (`imgtxt.serving.shell`): the same interceptors (error mapping,
admission gate, bearer-token auth, request check), health that ends Watch streams, reflection, keepalive, signals and
four-step stop as the encoder services. The HTTP side shares the shell's token checker and admission gate, reports
the shell's health on `/readyz`, and closes in the shell's last step; TLS on both ports from one certificate,
Prometheus metrics at `GET /metrics`.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import uvicorn

from imgtxt.connection import KEEPALIVE, Keepalive
from imgtxt.errors import ConfigError
from imgtxt.serving.shell import HealthServicer, Lifecycle, ServerShell, ShellConfig, wait_for_signal
from imgtxt.v1 import search_pb2 as pb
from imgtxt.v1 import search_pb2_grpc as pb_grpc
from search.backend import SearchBackend
from search_service.prometheus import SearchMetrics
from search_service.servicer import SearchServicer
from search_service.web import create_app

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SearchService"].full_name

__all__ = ["SearchServer", "SearchServerConfig", "create_search_server", "wait_for_signal"]


@dataclass(frozen=True)
class SearchServerConfig:
    """Where and how the search service listens and stops."""

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
    """Bearer token every rpc and HTTP route but health, readiness and the page must carry."""
    grace_s: float = 10.0
    """On stop, after the drain, how long admitted requests (both protocols) may take."""
    drain_delay_s: float = 5.0
    """On stop, how long health and `/readyz` report NOT_SERVING while requests are still answered."""
    keepalive: Keepalive = KEEPALIVE
    """Keepalive pings accepted from gRPC clients."""

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key must be given together")
        for name in ("port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(f"{name} must be in 0..65535, got {getattr(self, name)}")
        if self.auth_token is not None and not self.auth_token.strip():
            raise ConfigError("auth_token must not be empty (leave it unset to disable auth)")
        Lifecycle(self.grace_s, self.drain_delay_s)  # validates

    def shell_config(self) -> ShellConfig:
        """The shell's part of this configuration."""
        return ShellConfig(
            host=self.host,
            port=self.port,
            max_workers=self.max_workers,
            lifecycle=Lifecycle(grace_s=self.grace_s, drain_delay_s=self.drain_delay_s),
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            auth_token=self.auth_token,
            keepalive=self.keepalive,
        )


@dataclass
class SearchServer:
    """A started search process: the shell's gRPC server, the HTTP server thread, and what they share."""

    shell: ServerShell
    """gRPC server, health, gate, token checker and stop."""
    http_port: int
    """Bound HTTP port."""
    backend: SearchBackend
    """The domain object both protocols call."""
    metrics: SearchMetrics
    """Metrics of both protocols."""
    host: str = "127.0.0.1"
    """The address both ports are bound to."""
    _http: Any = None
    _thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """Bound gRPC port."""
        return self.shell.port

    @property
    def grpc_server(self) -> grpc.Server:
        """The gRPC server (started)."""
        return self.shell.server

    @property
    def health(self) -> HealthServicer:
        """Health servicer."""
        return self.shell.health

    @property
    def url(self) -> str:
        """The page's URL."""
        scheme = "https" if self._http is not None and self._http.config.ssl_certfile else "http"
        return f"{scheme}://{self.host}:{self.http_port}/"

    def stop(self, grace: float | None = None) -> None:
        """Stops both protocols in the shell's four steps (`ServerShell.stop`); HTTP closes last.

        Args:
            grace: Seconds admitted requests get after the drain (default `grace_s`; 0: stop now).
        """
        self.shell.stop(grace)

    def _close_http(self) -> None:
        if self._http is not None:
            self._http.should_exit = True
        if self._thread is not None:
            self._thread.join(30)


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
    shell = ServerShell(
        config.shell_config(),
        SERVICE_NAME,
        lambda server: pb_grpc.add_SearchServiceServicer_to_server(SearchServicer(backend), server),
        metrics,
        thread_name_prefix="search-grpc",
    )
    sock = _bind_http(config.host, config.http_port)
    app = create_app(backend, metrics, tokens=shell.tokens, gate=shell.gate, ready=lambda: shell.serving)
    http = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            ssl_certfile=str(config.tls_cert) if config.tls_cert else None,
            ssl_keyfile=str(config.tls_key) if config.tls_key else None,
            timeout_graceful_shutdown=max(1, int(config.grace_s)),
        )
    )
    thread = threading.Thread(target=http.run, kwargs={"sockets": [sock]}, name="search-http", daemon=True)
    out = SearchServer(shell, sock.getsockname()[1], backend, metrics, config.host, http, thread)
    shell.on_stop.append(out._close_http)
    shell.start()
    thread.start()
    shell.set_serving(True)
    logger.info(
        "search service listening",
        extra={
            "grpc_port": out.port,
            "http_port": out.http_port,
            "collection": backend.collection,
            "tls": bool(config.tls_cert),
        },
    )
    return out
