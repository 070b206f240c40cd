"""Starting the two encoder services as subprocesses on free loopback ports, and stopping them cleanly."""

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


def _wait_serving(svc: ServiceProcess, port_file: Path, timeout_s: float) -> None:
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
                channel = grpc.insecure_channel(svc.target)
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


@contextmanager
def run_services(
    bundle: Path, timeout_s: float = 180.0, extra_args: tuple[str, ...] = ()
) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    """Starts `imgtxt serve-image` and `imgtxt serve-text` on free loopback ports, yields once both are SERVING,
    and stops both (SIGTERM, wait) on exit."""
    started: list[ServiceProcess] = []
    with tempfile.TemporaryDirectory(prefix="imgtxt-services-") as tmp:
        try:
            for modality in ("image", "text"):
                port_file = Path(tmp) / f"{modality}.port"
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
                    "0",
                    *extra_args,
                ]
                env = {
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                }
                proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL)
                started.append(ServiceProcess(modality, proc))
            for svc in started:
                _wait_serving(svc, Path(tmp) / f"{svc.modality}.port", timeout_s)
            yield started[0], started[1]
        finally:
            for svc in started:
                stop_service(svc)
