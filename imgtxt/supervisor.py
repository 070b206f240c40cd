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


def read_port_file(port_file: Path) -> int | None:
    """The port a service wrote to its `--port-file`, or None while the file is absent or not yet complete (the
    service writes `PORT\\n`: a read racing the write may see an empty or partial line)."""
    try:
        text = port_file.read_text()
    except FileNotFoundError:
        return None
    return int(text) if text.endswith("\n") and text.strip().isdigit() else None


def _wait_serving(svc: ServiceProcess, port_file: Path, timeout_s: float, tls_ca: Path | None = None) -> None:
    """Polls the port file, then the gRPC health check, until SERVING; fails fast if the process exits."""
    deadline = time.monotonic() + timeout_s
    channel = None
    try:
        while time.monotonic() < deadline:
            code = svc.process.poll()
            if code is not None:
                raise RuntimeError(f"the {svc.modality} service exited with code {code} before serving")
            port = read_port_file(port_file) if channel is None else None
            if port is not None:
                svc.port = port
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
    """Launches `imgtxt serve-<modality>` on 127.0.0.1 and a free port; returns the process and its port file.

    The service runs in the caller's working directory, so relative paths in `bundle` and `extra_args` (`--tls-cert`,
    `--cache-dir`...) mean what they mean to the caller; `-P` keeps that directory off the service's import path (the
    project is found through PYTHONPATH). Its stdin is /dev/null and it inherits no descriptor but stdout and stderr
    (`close_fds`).

    It is started by vfork + exec: no `preexec_fn`, user or group, which would make CPython fork() instead. A fork()
    of a process with live gRPC channels runs gRPC's fork handlers in the child, whose restarted poller then fails on
    the descriptors `close_fds` closes: `epoll_wait error: Bad file descriptor` and SIGABRT before exec
    (grpc/grpc#43055), seen as a service that aborted at start-up.
    """
    port_file = Path(workdir).absolute() / f"{modality}.port"
    cmd = [
        sys.executable,
        "-P",
        "-m",
        "imgtxt.cli",
        f"serve-{modality}",
        "--bundle",
        str(Path(bundle).absolute()),
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
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True)
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
