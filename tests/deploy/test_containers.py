"""The three service images, built by deploy/containers/build.sh and run as containers on loopback (real podman).

The container tests are slow (the first build takes minutes), so opt-in: `make test-containers`
(`pytest -m slow tests/deploy/test_containers.py`); `.ci/run` runs them after `make test`. They skip where podman
is absent, except in CI (`CI=true`), where that is a failure. The images' requirements list is checked in the
default suite.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imgtxt.client import ImageEncoderClient, TextEncoderClient
from imgtxt.encoders.bundle import BundleEncoder
from search.backend import Query, SearchBackend
from store.factory import open_store
from tests.search_service.conftest import index  # noqa: F401  (the search tests' index: 12 images x 2 captions)
from tests.services.conftest import make_image

ROOT = Path(__file__).resolve().parents[2]
CONTAINERS = ROOT / "deploy" / "containers"
TARGETS = ("image-encoder", "text-encoder", "search")
START_TIMEOUT_S = 180.0
LISTENING = re.compile(r"listening on port (\d+)(?: \(gRPC\) and (\d+) \(HTTP\))?")


def _podman_missing() -> str | None:
    """Why the containers cannot run here, or None."""
    for tool in ("podman", "mmdebstrap", "runc"):
        if shutil.which(tool) is None:
            return f"{tool} not found (Debian packages podman, mmdebstrap, runc)"
    return None


@pytest.fixture(scope="module")
def podman_env() -> dict[str, str]:
    """The environment of every podman call: the project's containers.conf (runc, ulimits, the CA bundle)."""
    reason = _podman_missing()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the container test cannot run: {reason}")
        pytest.skip(reason)
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS / "containers.conf")}


def _podman(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], env=env, check=check, capture_output=True, text=True)


def _version() -> str:
    import tomllib

    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


@pytest.fixture(scope="module")
def images(podman_env: dict[str, str]) -> dict[str, str]:
    """The three images, built (or brought up to date) by the one build script users run."""
    result = subprocess.run(
        [str(CONTAINERS / "build.sh"), *TARGETS], env=podman_env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"build.sh failed:\n{result.stdout}\n{result.stderr}"
    return {target: f"localhost/imgtxt-{target}:{_version()}" for target in TARGETS}


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight bundle, world-readable (the containers run as uid 10001)."""
    out = Path(shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("container-bundle") / "bundle"))
    for path in (out, *out.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return out


@pytest.fixture(scope="module")
def baked_text_image(images: dict[str, str], bundle: Path, podman_env: dict[str, str]) -> Iterator[str]:
    """The text encoder image with the bundle baked in (bake.sh), instead of mounted; removed afterwards."""
    result = subprocess.run(
        [str(CONTAINERS / "bake.sh"), "text-encoder", str(bundle)],
        env=podman_env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"bake.sh failed:\n{result.stdout}\n{result.stderr}"
    image = result.stdout.strip().splitlines()[-1]
    yield image
    _podman(podman_env, "rmi", image, check=False)


class Container:
    """One `podman run -d` container on the host network; `stop()` sends SIGTERM and returns the exit code."""

    def __init__(self, env: dict[str, str], image: str, role: str, podman_args: tuple[str, ...] = ()) -> None:
        self.env = env
        self.name = f"imgtxt-test-{role}-{uuid.uuid4().hex[:8]}"
        _podman(
            env,
            "run",
            "--detach",
            "--name",
            self.name,
            "--network",
            "host",  # the services bind 127.0.0.1 of the host: loopback only
            "--read-only",  # as the Kubernetes manifests run them; podman mounts tmpfs on /tmp
            "--cap-drop",
            "all",
            "--security-opt",
            "no-new-privileges",
            "--env",
            "IMGTXT_HOST=127.0.0.1",
            "--env",
            "IMGTXT_PORT=0",
            "--env",
            "IMGTXT_CACHE_DIR=/tmp/ort-cache",
            *podman_args,
            image,
        )

    def logs(self) -> str:
        """Everything the container wrote so far."""
        out = _podman(self.env, "logs", self.name, check=False)
        return out.stdout + out.stderr

    def wait_listening(self, timeout_s: float = START_TIMEOUT_S) -> tuple[int, int | None]:
        """Follows the container's output to its `listening on port N` line; returns (gRPC port, HTTP port or None).

        Raises AssertionError (with the logs) when the container exits first or says nothing within `timeout_s`.
        """
        follow = subprocess.Popen(
            ["podman", "logs", "--follow", self.name],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert follow.stdout is not None
            for line in follow.stdout:
                lines.put(line)
            lines.put(None)  # the container exited: its log ended

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    line = lines.get(timeout=max(deadline - time.monotonic(), 0.001))
                except queue.Empty:
                    raise AssertionError(
                        f"{self.name}: no 'listening' line in {timeout_s:.0f} s:\n{self.logs()}"
                    ) from None
                if line is None:
                    raise AssertionError(f"{self.name} exited before serving:\n{self.logs()}")
                match = LISTENING.search(line)
                if match:
                    return int(match.group(1)), int(match.group(2)) if match.group(2) else None
        finally:
            follow.kill()
            follow.wait()

    def stop(self, timeout_s: int = 60) -> int:
        """`podman stop` (SIGTERM, the image's STOPSIGNAL; SIGKILL only after `timeout_s`), then its exit code."""
        _podman(self.env, "stop", "--time", str(timeout_s), self.name)
        return int(_podman(self.env, "wait", self.name).stdout.strip())

    def remove(self) -> None:
        """Removes the container, running or not."""
        _podman(self.env, "rm", "--force", "--time", "0", self.name, check=False)


def _health(port: int) -> int:
    """The gRPC health status (overall service "") on 127.0.0.1:port."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=30, wait_for_ready=True
        )
    return int(reply.status)


def _http_json(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return dict(json.loads(response.read()))


@contextlib.contextmanager
def _removing(containers: list[Container]) -> Iterator[list[Container]]:
    try:
        yield containers
    finally:
        for c in containers:
            c.remove()


COLLECTION = "search-test"  # the index fixture's
QUERY = "photo 3 shows thing 1 in colour 10"


def _requirements_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("container_requirements", CONTAINERS / "requirements.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("onnxruntime", ["onnxruntime", "onnxruntime-gpu"])
def test_requirements_name_one_onnxruntime(onnxruntime: str) -> None:
    """The image's requirements are pyproject's dependencies with exactly the chosen ONNX Runtime, its range kept."""
    import tomllib

    from pip._vendor.packaging.requirements import Requirement

    reqs = [
        Requirement(r) for r in _requirements_module().serving_requirements(str(ROOT / "pyproject.toml"), onnxruntime)
    ]
    ort = [r for r in reqs if r.name in ("onnxruntime", "onnxruntime-gpu")]
    assert [r.name for r in ort] == [onnxruntime]
    declared = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    assert ort[0].specifier == next(d.specifier for d in declared if d.name == "onnxruntime-gpu")
    assert all(r.marker is None for r in reqs)
    assert {r.name for r in reqs} - {onnxruntime} == {d.name for d in declared} - {"onnxruntime", "onnxruntime-gpu"}


def test_requirements_refuse_another_package() -> None:
    """A misspelt ONNXRUNTIME build argument stops the build, naming the choices."""
    with pytest.raises(SystemExit, match=r"onnxruntime, onnxruntime-gpu, got 'onnxruntime-cpu'"):
        _requirements_module().serving_requirements(str(ROOT / "pyproject.toml"), "onnxruntime-cpu")


@pytest.mark.slow
def test_images_are_non_root_and_torch_free(images: dict[str, str], podman_env: dict[str, str]) -> None:
    """Each image runs as uid 10001 and holds the serving install: no torch, exactly one ONNX Runtime package."""
    probe = (
        "import importlib.metadata as m, importlib.util as u, json, os; "
        "d = {x.metadata['Name'].lower() for x in m.distributions()}; "
        "ort = sorted(d & {'onnxruntime', 'onnxruntime-gpu'}); "
        "print(json.dumps([os.getuid(), u.find_spec('torch') is not None, ort]))"
    )
    for image in images.values():
        out = json.loads(_podman(podman_env, "run", "--rm", "--entrypoint", "python", image, "-c", probe).stdout)
        assert out == [10001, False, ["onnxruntime"]], f"{image}: {out}"


@pytest.mark.slow
def test_services_in_containers(
    images: dict[str, str],
    baked_text_image: str,
    bundle: Path,
    index: tuple[Path, Path],  # noqa: F811  (the imported fixture)
    encoder: BundleEncoder,
    podman_env: dict[str, str],
) -> None:
    """Encoders (bundle mounted / baked) and search as containers: SERVING, in-process parity, HTTP search, SIGTERM."""
    image_bytes, caption = make_image(7, size=(64, 48)), "a dog runs through the grass"
    expected_image = encoder.encode_images([image_bytes]).embeddings
    expected_text = encoder.encode_texts([caption]).embeddings
    store = index[1]  # indexed from the host by the in-process indexer
    s = open_store(store)  # the embedded engine is opened by one process at a time: ask it before the container does
    try:
        expected_hits = SearchBackend(s, encoder, COLLECTION).search(Query(text=QUERY, limit=5)).hits
    finally:
        s.close()
    assert len(expected_hits) == 5

    fast_stop = ("--env", "IMGTXT_DRAIN_DELAY_S=0.5", "--env", "IMGTXT_GRACE_S=5")
    with _removing([]) as running:
        image_svc = Container(
            podman_env, images["image-encoder"], "image", ("--volume", f"{bundle}:/bundle:ro", *fast_stop)
        )
        running.append(image_svc)
        text_svc = Container(podman_env, baked_text_image, "text", fast_stop)
        running.append(text_svc)
        image_port, _ = image_svc.wait_listening()
        text_port, _ = text_svc.wait_listening()
        assert _health(image_port) == health_pb2.HealthCheckResponse.SERVING
        assert _health(text_port) == health_pb2.HealthCheckResponse.SERVING

        with ImageEncoderClient(f"127.0.0.1:{image_port}") as client:
            assert client.info().execution_provider == "CPUExecutionProvider"
            got_image = client.encode([image_bytes]).embeddings
        with TextEncoderClient(f"127.0.0.1:{text_port}") as client:
            got_text = client.encode([caption]).embeddings
        assert float(np.abs(got_image - expected_image).max()) <= 1e-6
        assert float(np.abs(got_text - expected_text).max()) <= 1e-6

        search_svc = Container(
            podman_env,
            images["search"],
            "search",
            (
                "--volume",
                f"{store}:/data/qdrant:U",  # :U hands the store to the container's user
                "--env",
                "IMGTXT_HTTP_PORT=0",
                "--env",
                f"IMGTXT_COLLECTION={COLLECTION}",
                "--env",
                f"IMGTXT_IMAGE_SERVICE=127.0.0.1:{image_port}",
                "--env",
                f"IMGTXT_TEXT_SERVICE=127.0.0.1:{text_port}",
            ),
        )
        running.append(search_svc)
        search_port, http_port = search_svc.wait_listening()
        assert http_port is not None
        assert _health(search_port) == health_pb2.HealthCheckResponse.SERVING
        answer = _http_json(f"http://127.0.0.1:{http_port}/v1/search", {"text": QUERY, "limit": 5})
        assert answer["collection"] == COLLECTION
        assert [h["id"] for h in answer["hits"]] == [h.id for h in expected_hits]
        np.testing.assert_allclose([h["score"] for h in answer["hits"]], [h.score for h in expected_hits], atol=1e-5)

        codes = {c.name: c.stop() for c in (search_svc, text_svc, image_svc)}
        assert codes == {c.name: 0 for c in running}, "\n\n".join(c.logs() for c in running)
