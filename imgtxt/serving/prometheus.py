"""Prometheus metrics of one encoder service, in a registry of its own (several servers can share a test process)."""

from __future__ import annotations

import logging
import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from imgtxt.serving.auth import TokenChecker

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STAGES = ("queue", "preprocess", "inference")


class ServiceMetrics:
    """Requests, errors by code, items, batch sizes, queue depth and per-stage latency of one service."""

    def __init__(self, modality: str, max_batch: int) -> None:
        """Creates the metrics in a fresh registry.

        Args:
            modality: `image` or `text` (a label on every metric, so one dashboard serves both).
            max_batch: Largest batch, for the batch-size histogram's buckets.
        """
        self.registry = CollectorRegistry()
        self.modality = modality
        labels = ["modality"]
        r = self.registry
        self.requests = Counter("imgtxt_encoder_requests", "Rpcs received.", [*labels, "method"], registry=r)
        self.errors = Counter(
            "imgtxt_encoder_errors", "Rpcs that failed, by gRPC status code.", [*labels, "method", "code"], registry=r
        )
        self.items = Counter(
            "imgtxt_encoder_items", "Items processed, by per-item outcome.", [*labels, "code"], registry=r
        )
        size_buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, max_batch})
        self.batch_size = Histogram(
            "imgtxt_encoder_batch_size", "Items per session run.", labels, buckets=size_buckets, registry=r
        )
        self.queue_depth = Gauge("imgtxt_encoder_queue_depth", "Items waiting for the session.", labels, registry=r)
        self.stage_seconds = Histogram(
            "imgtxt_encoder_stage_seconds",
            "Time per stage: queue (waiting for a batch), preprocess (decode/tokenize), inference (session run).",
            [*labels, "stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "imgtxt_encoder_request_seconds", "Rpc latency.", [*labels, "method"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.info = Gauge(
            "imgtxt_encoder_info",
            "Always 1; labels say what is served and on which execution provider.",
            [*labels, "bundle_version", "execution_provider", "precision", "precision_reason", "batching"],
            registry=r,
        )
        avg = Gauge("imgtxt_encoder_batch_size_average", "Mean items per session run since start.", labels, registry=r)
        avg.labels(modality).set_function(self.average_batch_size)
        self._batches = 0
        self._batched_items = 0
        self._lock = threading.Lock()

    def set_info(
        self,
        bundle_version: str,
        execution_provider: str,
        precision: str = "fp32",
        precision_reason: str = "",
        batching: str = "",
    ) -> None:
        """Publishes the bundle, the active provider, the served precision (and why), and batching on or off."""
        self.info.labels(self.modality, bundle_version, execution_provider, precision, precision_reason, batching).set(
            1
        )

    def observe_batch(self, size: int) -> None:
        """Records one session run of `size` items."""
        self.batch_size.labels(self.modality).observe(size)
        with self._lock:
            self._batches += 1
            self._batched_items += size

    def average_batch_size(self) -> float:
        """Mean items per session run so far (0 before the first)."""
        with self._lock:
            return self._batched_items / self._batches if self._batches else 0.0

    def observe_stage(self, stage: str, seconds: float, count: int = 1) -> None:
        """Records the time `count` requests spent in `stage`."""
        hist = self.stage_seconds.labels(self.modality, stage)
        for _ in range(count):
            hist.observe(seconds)

    def count_items(self, codes: list[int]) -> None:
        """Counts items by their per-item status code."""
        for code in set(codes):
            self.items.labels(self.modality, str(code)).inc(codes.count(code))

    def labels(self, metric: Any, *values: str) -> Any:
        """`metric.labels(modality, *values)`."""
        return metric.labels(self.modality, *values)

    def serve_http(self, port: int, host: str = "127.0.0.1", tokens: TokenChecker | None = None) -> tuple[Any, int]:
        """Starts the `/metrics` endpoint in a daemon thread; returns the HTTP server and its bound port.

        Args:
            port: Port (0: a free one).
            host: Bind address.
            tokens: With a token configured, scrapes must carry `Authorization: Bearer <token>` (401 otherwise).
        """
        app = make_wsgi_app(self.registry)

        def guarded(environ: dict[str, Any], start_response: Any) -> Any:
            if tokens is not None and not tokens.check(environ.get("HTTP_AUTHORIZATION")):
                start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
                return [b"missing or invalid bearer token (header 'Authorization: Bearer <token>')\n"]
            return app(environ, start_response)

        server = make_server(host.strip("[]"), port, guarded, _ThreadingServer, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        bound = int(server.server_port)
        logger.info("metrics endpoint listening", extra={"host": host, "port": bound, "auth": tokens is not None})
        return server, bound


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug(format, *args)
