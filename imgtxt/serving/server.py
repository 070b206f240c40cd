"""Building, running and stopping one encoder gRPC server: interceptors, health, reflection, TLS, metrics, draining."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from imgtxt.encoders.tower import TowerEncoder
from imgtxt.errors import ConfigError
from imgtxt.serving.batcher import DynamicBatcher, InlineRunner, Runner
from imgtxt.serving.config import ServerConfig
from imgtxt.serving.interceptors import AuthInterceptor, ErrorMappingInterceptor
from imgtxt.serving.prometheus import ServiceMetrics
from imgtxt.serving.servicer import EncoderServicerBase, EncodeService

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class EncoderServer:
    """A started server and what it owns; NOT_SERVING until `warm_up()`."""

    server: grpc.Server
    """The gRPC server (already started)."""
    port: int
    """The bound gRPC port."""
    service_name: str
    """Full name of the served service, e.g. `imgtxt.v1.TextEncoder`."""
    config: ServerConfig
    """The configuration it was built with."""
    encoder: TowerEncoder[Any, Any]
    """The domain encoder."""
    runner: Runner
    """The dynamic batcher (or the inline runner when batching is off)."""
    metrics: ServiceMetrics
    """Its metrics registry."""
    health: health.HealthServicer
    """Health servicer (overall status "" and the service's own name)."""
    metrics_port: int | None = None
    """Port of the `/metrics` endpoint, when one runs."""
    _metrics_http: Any = None

    def set_serving(self, serving: bool) -> None:
        """Sets the health status of the server and of its service."""
        status = SERVING if serving else NOT_SERVING
        for name in ("", self.service_name):
            self.health.set(name, status)

    def warm_up(self) -> None:
        """Runs a warm-up batch through the session, then reports SERVING."""
        self.encoder.warm_up()
        info = self.encoder.info
        self.metrics.set_info(info.bundle_version, info.execution_provider)
        self.set_serving(True)
        logger.info(
            "serving",
            extra={
                "service": self.service_name,
                "port": self.port,
                "bundle": info.bundle_version,
                "provider": info.execution_provider,
            },
        )

    def drain(self) -> None:
        """Reports NOT_SERVING (load balancers stop sending) while rpcs keep being answered."""
        self.health.enter_graceful_shutdown()
        logger.info("draining", extra={"service": self.service_name})

    def stop(self, grace: float | None = None) -> None:
        """Drains, waits `drain_delay_s`, stops accepting rpcs, lets in-flight ones finish within `grace` seconds."""
        self.drain()
        if self.config.drain_delay_s:
            time.sleep(self.config.drain_delay_s)  # operational delay for load balancers to notice, not sync
        self.server.stop(self.config.grace_s if grace is None else grace).wait()
        self.runner.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        logger.info("stopped", extra={"service": self.service_name})


ServicerFactory = Callable[[EncodeService[Any], int, int], EncoderServicerBase[Any]]


def build_server(
    config: ServerConfig,
    encoder: TowerEncoder[Any, Any],
    make_servicer: ServicerFactory,
    add_to_server: Callable[[Any, grpc.Server], None],
    service_name: str,
) -> EncoderServer:
    """Builds, registers, binds and starts a server without blocking; health stays NOT_SERVING until `warm_up()`.

    Args:
        config: Server settings.
        encoder: The loaded domain encoder.
        make_servicer: `(service, max_message_bytes, stream_window) -> servicer` of the modality.
        add_to_server: The generated `add_<Service>Servicer_to_server`.
        service_name: Full proto name of the service (for health and reflection).

    Raises:
        ConfigError: The port could not be bound, or TLS files are unreadable.
    """
    metrics = ServiceMetrics(encoder.modality, config.max_batch)
    runner: Runner
    if config.batching:
        runner = DynamicBatcher(encoder.run, metrics, config.max_batch, config.max_delay_us, config.max_queue)
    else:
        runner = InlineRunner(encoder.run, metrics)
    interceptors: list[grpc.ServerInterceptor] = [ErrorMappingInterceptor(metrics)]
    if config.auth_token:
        interceptors.append(AuthInterceptor(config.auth_token))
    server = grpc.server(
        ThreadPoolExecutor(config.max_workers, thread_name_prefix="grpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    service = EncodeService(encoder, runner, metrics, config.max_batch)
    add_to_server(make_servicer(service, config.max_message_bytes, config.stream_window), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    try:
        if config.tls_cert is not None and config.tls_key is not None:
            creds = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except (OSError, RuntimeError) as exc:
        runner.close()
        raise ConfigError(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        runner.close()
        raise ConfigError(f"cannot listen on {address} (address in use or not available)")
    out = EncoderServer(server, port, service_name, config, encoder, runner, metrics, health_servicer)
    out.set_serving(False)
    if config.metrics_port is not None:
        out._metrics_http, out.metrics_port = metrics.serve_http(config.metrics_port, config.metrics_host)
    server.start()
    logger.info(
        "listening", extra={"address": address, "port": port, "tls": config.tls, "auth": bool(config.auth_token)}
    )
    return out
