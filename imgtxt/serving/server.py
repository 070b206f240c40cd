"""Building, running and stopping one encoder gRPC server: interceptors, health, reflection, TLS, metrics, draining."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from imgtxt.encoders.tower import TowerEncoder
from imgtxt.errors import ConfigError
from imgtxt.serving.batcher import DynamicBatcher, InlineRunner, Runner
from imgtxt.serving.config import ServerConfig
from imgtxt.serving.interceptors import AdmissionGate, AuthInterceptor, ErrorMappingInterceptor
from imgtxt.serving.prometheus import ServiceMetrics
from imgtxt.serving.servicer import EncoderServicerBase, EncodeService
from imgtxt.serving.tuning import BatchingPlan, log_plan

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _HealthServicer(health.HealthServicer):
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
    health: _HealthServicer
    """Health servicer (overall status "" and the service's own name)."""
    gate: AdmissionGate
    """Refuses new rpcs (UNAVAILABLE) once the server stops."""
    metrics_port: int | None = None
    """Port of the `/metrics` endpoint, when one runs."""
    batching: BatchingPlan | None = None
    """How requests reach the session (batched or not, workers, threads) and why."""
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
        batching = self.batching.mode if self.batching else ""
        self.metrics.set_info(
            info.bundle_version, info.execution_provider, info.precision, info.precision_reason, batching
        )
        self.set_serving(True)
        logger.info(
            "serving",
            extra={
                "service": self.service_name,
                "port": self.port,
                "bundle": info.bundle_version,
                "provider": info.execution_provider,
                "precision": info.precision,
                "batching": batching,
            },
        )

    def drain(self) -> None:
        """Reports NOT_SERVING (load balancers stop sending) while rpcs keep being answered."""
        self.health.enter_graceful_shutdown()
        logger.info("draining", extra={"service": self.service_name})

    def stop(self, grace: float | None = None) -> None:
        """Stops in four steps, so that no rpc a client sent is lost and every refused one is retryable:

        1. drain: health says NOT_SERVING, rpcs are still answered for `drain_delay_s` (load balancers and
           health-checking client channels move away);
        2. refuse: new rpcs get UNAVAILABLE from the admission gate, health `Watch` streams end, admitted rpcs
           (streams included) get up to `grace` seconds to finish;
        3. gRPC's own stop with what is left of the grace: the port closes, anything still running is cancelled;
        4. the batcher runs what is queued and stops.

        The drain is what keeps rpcs from being lost: gRPC's own stop answers CANCELLED, a status clients do not
        retry, to rpcs it has accepted but not yet handed to a handler (grpc/grpc#41785), so clients must have
        stopped sending by then. Health-checking client channels (round_robin with a `healthCheckConfig`) stop the
        moment they see NOT_SERVING; a client that ignores health and keeps sending through the stop can still meet
        that race. The gate makes everything this server refuses itself UNAVAILABLE.

        Args:
            grace: Seconds in-flight rpcs get after the drain (default `grace_s`; 0: stop now — no drain, in-flight
                rpcs cancelled at once, as a test or a second SIGTERM wants).
        """
        grace = self.config.grace_s if grace is None else grace
        self.drain()
        if self.config.drain_delay_s and grace > 0:
            time.sleep(self.config.drain_delay_s)  # operational delay for load balancers to notice, not sync
        deadline = time.monotonic() + grace
        self.gate.close()
        self.health.end_watches()
        if not self.gate.wait_idle(grace):
            logger.warning("grace period over: cancelling %d rpcs", self.gate.active)
        self.server.stop(max(0.0, deadline - time.monotonic())).wait()
        self.runner.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        logger.info("stopped", extra={"service": self.service_name})


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
    plan = config.batching_plan(encoder.provider, encoder.modality, encoder.intra_op_threads)
    log_plan(plan, encoder.modality)
    if plan.batching:
        runner = DynamicBatcher(
            encoder.run,
            metrics,
            config.max_batch,
            config.max_delay_us,
            config.max_queue,
            plan.batch_workers,
            plan.run_alone_when_idle,
        )
    else:
        runner = InlineRunner(encoder.run, metrics)
    gate = AdmissionGate()
    # Outermost first: the error mapping answers what the gate and the auth check raise.
    interceptors: list[grpc.ServerInterceptor] = [ErrorMappingInterceptor(metrics), gate]
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
    service = EncodeService(encoder, runner, metrics, config.max_batch, plan)
    add_to_server(make_servicer(service, config.max_message_bytes, config.stream_window), server)
    health_servicer = _HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    try:
        port = bind(server, config.host, config.port, config.tls_cert, config.tls_key)
    except ConfigError:
        runner.close()
        raise
    out = EncoderServer(
        server, port, service_name, config, encoder, runner, metrics, health_servicer, gate, batching=plan
    )
    out.set_serving(False)
    if config.metrics_port is not None:
        out._metrics_http, out.metrics_port = metrics.serve_http(config.metrics_port, config.metrics_host)
    server.start()
    logger.info(
        "listening", extra={"address": address, "port": port, "tls": config.tls, "auth": bool(config.auth_token)}
    )
    return out
