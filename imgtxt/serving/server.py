"""Building one encoder gRPC server in the shared shell (`imgtxt.serving.shell`): batcher, servicer, metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from imgtxt.encoders.tower import TowerEncoder
from imgtxt.errors import ConfigError
from imgtxt.serving.batcher import DynamicBatcher, InlineRunner, Runner
from imgtxt.serving.config import ServerConfig
from imgtxt.serving.interceptors import AdmissionGate
from imgtxt.serving.prometheus import ServiceMetrics
from imgtxt.serving.servicer import EncoderServicerBase, EncodeService
from imgtxt.serving.shell import HealthServicer, Lifecycle, ServerShell, ShellConfig
from imgtxt.serving.tuning import BatchingPlan, log_plan

logger = logging.getLogger(__name__)


@dataclass
class EncoderServer:
    """A started encoder server and what it owns; NOT_SERVING until `warm_up()`. Its lifecycle is the shell's."""

    shell: ServerShell
    """The gRPC server, its health, gate and stop."""
    config: ServerConfig
    """The configuration it was built with."""
    encoder: TowerEncoder[Any, Any]
    """The domain encoder."""
    runner: Runner
    """The dynamic batcher (or the inline runner when batching is off)."""
    metrics: ServiceMetrics
    """Its metrics registry."""
    metrics_port: int | None = None
    """Port of the `/metrics` endpoint, when one runs."""

    @property
    def server(self) -> grpc.Server:
        """The gRPC server (already started)."""
        return self.shell.server

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.shell.port

    @property
    def service_name(self) -> str:
        """Full name of the served service, e.g. `imgtxt.v1.TextEncoder`."""
        return self.shell.service_name

    @property
    def health(self) -> HealthServicer:
        """Health servicer (overall status "" and the service's own name)."""
        return self.shell.health

    @property
    def gate(self) -> AdmissionGate:
        """Refuses new rpcs (UNAVAILABLE) once the server stops."""
        return self.shell.gate

    batching: BatchingPlan | None = None
    """How requests reach the session (batched or not, workers, threads) and why."""

    def set_serving(self, serving: bool) -> None:
        """Sets the health status of the server and of its service."""
        self.shell.set_serving(serving)

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
        self.shell.drain()

    def stop(self, grace: float | None = None) -> None:
        """Stops in the shell's four steps (`ServerShell.stop`); the batcher runs what is queued and stops last.

        Args:
            grace: Seconds in-flight rpcs get after the drain (default `grace_s`; 0: stop now).
        """
        self.shell.stop(grace)


def shell_config(config: ServerConfig) -> ShellConfig:
    """The shell's part of an encoder server's configuration."""
    return ShellConfig(
        host=config.host,
        port=config.port,
        max_workers=config.max_workers,
        lifecycle=Lifecycle(grace_s=config.grace_s, drain_delay_s=config.drain_delay_s),
        tls_cert=config.tls_cert,
        tls_key=config.tls_key,
        auth_token=config.auth_token,
        max_concurrent_rpcs=config.max_concurrent_rpcs,
        max_message_bytes=config.max_message_bytes,
        keepalive=config.keepalive,
    )


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
    service = EncodeService(encoder, runner, metrics, config.max_batch, plan)

    def register(server: grpc.Server) -> None:
        add_to_server(make_servicer(service, config.max_message_bytes, config.stream_window), server)

    try:
        shell = ServerShell(shell_config(config), service_name, register, metrics)
    except ConfigError:
        runner.close()
        raise
    out = EncoderServer(shell, config, encoder, runner, metrics, batching=plan)
    shell.on_stop.append(runner.close)
    if config.metrics_port is not None:
        metrics_http, out.metrics_port = metrics.serve_http(config.metrics_port, config.metrics_host, shell.tokens)
        shell.on_stop.append(metrics_http.shutdown)
    shell.start()
    return out
