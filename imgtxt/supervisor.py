"""The one process supervisor: encoder services as subprocesses on free loopback ports, SERVING checks, clean stops."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ServiceProcess:
    """A running service subprocess."""

    modality: str
    """`image` or `text`."""
    process: subprocess.Popen[bytes]
    """The subprocess."""
    port: int = 0
    """Its gRPC port, once known."""

    @property
    def target(self) -> str:
        """`127.0.0.1:<port>`."""
        return f"127.0.0.1:{self.port}"


def _wait_serving(svc: ServiceProcess, port_file: Path, timeout_s: float, tls_ca: Path | None = None) -> None:
    """Polls the port file, then the gRPC health check, until SERVING; fails fast if the process exits."""
    deadline = time.monotonic() + timeout_s
    channel = None
    try:
        while time.monotonic() < deadline:
            code = svc.process.poll()
            if code is not None:
                raise RuntimeError(f"the {svc.modality} service exited with code {code} before serving")
            if channel is None and port_file.is_file() and port_file.read_text().strip():
                svc.port = int(port_file.read_text().strip())
                channel = (
                    grpc.secure_channel(svc.target, grpc.ssl_channel_credentials(tls_ca.read_bytes()))
                    if tls_ca is not None
                    else grpc.insecure_channel(svc.target)
                )
            if channel is not None:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=1
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass  # not listening yet, or NOT_SERVING while warming up
            with contextlib.suppress(subprocess.TimeoutExpired):
                svc.process.wait(timeout=0.05)  # the poll interval; returns early if the process dies
        raise TimeoutError(f"the {svc.modality} service did not report SERVING within {timeout_s:.0f} s")
    finally:
        if channel is not None:
            channel.close()


def stop_service(svc: ServiceProcess, timeout_s: float = 30.0) -> int:
    """SIGTERM (the service drains and exits), wait; SIGKILL only if it does not exit in time."""
    if svc.process.poll() is None:
        svc.process.send_signal(signal.SIGTERM)
        try:
            return svc.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("service did not stop in time; killing it", extra={"modality": svc.modality})
            svc.process.kill()
    return svc.process.wait()


def start_service(
    modality: str, bundle: Path, workdir: Path, extra_args: tuple[str, ...] = ()
) -> tuple[ServiceProcess, Path]:
    """Launches `imgtxt serve-<modality>` on 127.0.0.1 and a free port; returns the process and its port file."""
    port_file = Path(workdir) / f"{modality}.port"
    cmd = [
        sys.executable,
        "-m",
        "imgtxt.cli",
        f"serve-{modality}",
        "--bundle",
        str(bundle),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--drain-delay-s",
        "0.5",
        *extra_args,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL)
    return ServiceProcess(modality, proc), port_file


@contextmanager
def run_services(
    bundle: Path,
    timeout_s: float = 180.0,
    extra_args: tuple[str, ...] = (),
    modalities: tuple[str, ...] = ("image", "text"),
    tls_ca: Path | None = None,
) -> Iterator[tuple[ServiceProcess, ...]]:
    """Starts `imgtxt serve-<modality>` for each modality (default both) on free loopback ports, yields the processes
    (in `modalities` order) once all are SERVING, and stops them (SIGTERM, wait) on exit.

    The demo, the benchmarks and the tests all start services through here.

    Args:
        bundle: Bundle directory the services load.
        timeout_s: How long each service may take to report SERVING.
        extra_args: Flags passed to every service (e.g. `("--device", "cpu", "--batching", "off")`).
        modalities: Which services to start.
        tls_ca: Root certificate to check their health over TLS (when `extra_args` make them TLS-only).
    """
    started: list[tuple[ServiceProcess, Path]] = []
    with tempfile.TemporaryDirectory(prefix="imgtxt-services-") as tmp:
        try:
            for modality in modalities:
                started.append(start_service(modality, bundle, Path(tmp), extra_args))
            for svc, port_file in started:
                _wait_serving(svc, port_file, timeout_s, tls_ca)
            yield tuple(svc for svc, _ in started)
        finally:
            for svc, _ in started:
                stop_service(svc)
