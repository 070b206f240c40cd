"""Prometheus metrics of the search service (both protocols), in a registry of its own."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class SearchMetrics:
    """Requests, errors by status and latency per method and protocol.

    Shaped like the encoders' `ServiceMetrics` where `imgtxt.serving.interceptors.ErrorMappingInterceptor` reads it
    (`requests`, `errors`, `request_seconds`, `labels`), so the gRPC side maps errors in the same one place.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.protocol = "grpc"
        self.requests = Counter("imgtxt_search_requests", "Requests received.", ["protocol", "method"], registry=r)
        self.errors = Counter(
            "imgtxt_search_errors", "Requests that failed, by status.", ["protocol", "method", "code"], registry=r
        )
        self.request_seconds = Histogram(
            "imgtxt_search_request_seconds", "Request latency.", ["protocol", "method"], buckets=_BUCKETS, registry=r
        )

    def labels(self, metric: Any, *values: str) -> Any:
        """`metric.labels("grpc", *values)`: the interceptor's view."""
        return metric.labels(self.protocol, *values)

    def http(self, metric: Any, *values: str) -> Any:
        """`metric.labels("http", *values)`."""
        return metric.labels("http", *values)
