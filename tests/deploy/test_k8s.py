"""The Kubernetes manifests (deploy/k8s): every overlay renders, validates against the Kubernetes schemas in strict
mode, and agrees with what the services' own flag parsers make of its commands and environment.

No cluster runs here. Rendering uses the kustomize built into `kubectl` (or a `kustomize` binary), both offline.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import kubernetes_validate
import pytest
import yaml

from image_encoder_service.server import SERVICE_NAME as IMAGE_SERVICE
from imgtxt.config import env_name
from imgtxt.serving.config import add_server_flags, server_config_from_args
from indexer.cli import index_parser
from search_service.__main__ import build_parser as search_parser
from search_service.server import SERVICE_NAME as SEARCH_SERVICE
from search_service.server import SearchServerConfig
from text_encoder_service.server import SERVICE_NAME as TEXT_SERVICE

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSION = "1.37.0"
"""The API the manifests are written for: the first whose gRPC probes have `mode: TLS` (the services serve TLS
only)."""
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
IMGTXT_IMAGES = ("localhost/imgtxt-image-encoder", "localhost/imgtxt-text-encoder", "localhost/imgtxt-search")
QDRANT_IMAGE = "qdrant/qdrant"
SECRET_VARIABLES = ("IMGTXT_AUTH_TOKEN", "IMGTXT_TOKEN", "IMGTXT_API_KEY")
"""Variables that hold a credential: they must come from a Secret, never from a literal value."""

Doc = dict[str, Any]


def _renderer() -> list[str] | None:
    """The offline kustomize to render with: a `kustomize` binary, else `kubectl kustomize`; None without either."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render(overlay: str) -> list[Doc]:
    """The manifests of one overlay, rendered by kustomize."""
    command = _renderer()
    if command is None:
        if os.environ.get("CI"):
            pytest.fail("neither kustomize nor kubectl is installed: CI must render the manifests")
        pytest.skip("neither kustomize nor kubectl (which has kustomize built in) is installed")
    out = subprocess.run([*command, str(K8S / "overlays" / overlay)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, f"kustomize failed on overlay {overlay}: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    """(overlay name, its rendered manifests)."""
    return request.param, render(request.param)


def _name(doc: Doc) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def _of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def _pod_specs(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(workload, its pod spec) for every Deployment, StatefulSet and Job."""
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield d, d["spec"]["template"]["spec"]


def _containers(docs: list[Doc]) -> Iterator[tuple[Doc, Doc, Doc]]:
    """(workload, pod spec, container) for every container."""
    for d, pod in _pod_specs(docs):
        for c in pod.get("initContainers", []) + pod["containers"]:
            yield d, pod, c


def _env(container: Doc) -> dict[str, str]:
    """The container's environment as the process sees it. Values from a Secret or the downward API are not in the
    manifests: they become a placeholder naming their source (`from-secretKeyRef`)."""
    env = {}
    for e in container.get("env", []):
        env[e["name"]] = e["value"] if "value" in e else "from-" + "-".join(e["valueFrom"])
    return env


# The parser of each `imgtxt` sub-command the manifests run, and the gRPC service it serves (health's service names).
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "serve-image": lambda: _server_parser("image"),
    "serve-text": lambda: _server_parser("text"),
    "serve-search": search_parser,
    "index": index_parser,
}
SERVED = {"serve-image": IMAGE_SERVICE, "serve-text": TEXT_SERVICE, "serve-search": SEARCH_SERVICE}


def _server_parser(modality: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"imgtxt serve-{modality}")
    add_server_flags(parser, modality)
    return parser


def parse_container(container: Doc, substitutions: dict[str, str] | None = None) -> argparse.Namespace:
    """What the container's `imgtxt` command makes of its arguments and `IMGTXT_*` environment: its own parser, run
    with exactly that environment (so defaults, variables and types resolve as they will in the pod).

    Raises:
        AssertionError: The command is not one of ours, or a variable names no option of it, or a value is invalid.
    """
    command = container["command"] + container.get("args", [])
    assert command[0] == "imgtxt" and command[1] in PARSERS, f"{container['name']}: unknown command {command[:2]}"
    env = _env(container)
    expand = {**env, **(substitutions or {})}
    argv = [re.sub(r"\$\((\w+)\)", lambda m: expand[m.group(1)], a) for a in command[2:]]
    with mock.patch.dict(os.environ, env, clear=True):
        parser = PARSERS[command[1]]()
        known = {env_name(o) for a in parser._actions for o in a.option_strings if o.startswith("--")}
        unknown = sorted(v for v in env if v.startswith("IMGTXT_") and v not in known)
        assert not unknown, f"{container['name']}: {unknown} name no option of `imgtxt {command[1]}`"
        try:
            return parser.parse_args(argv)
        except SystemExit as exc:
            raise AssertionError(f"{container['name']}: `imgtxt {command[1]}` refuses its arguments/env") from exc


# ---- checks a schema cannot make; each returns the problems it found ----


def probe_problems(docs: list[Doc]) -> list[str]:
    """Every probe of our services targets the port its service listens on, as its own parser resolves it."""
    problems = []
    for d, _, c in _containers(docs):
        if c["command"][:1] != ["imgtxt"] or c["command"][1] == "index":
            continue
        args = parse_container(c)
        ports = {"grpc": args.port, "http": getattr(args, "http_port", None)}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(kind)
            if probe is None:
                if kind != "startupProbe":
                    problems.append(f"{_name(d)}: no {kind}")
                continue
            for action in ("grpc", "httpGet"):
                if action in probe and probe[action]["port"] != ports["grpc" if action == "grpc" else "http"]:
                    problems.append(f"{_name(d)}: {kind} {action} port {probe[action]['port']}, service on {ports}")
            if probe.get("grpc", {}).get("service", "") not in ("", SERVED[c["command"][1]]):
                problems.append(f"{_name(d)}: {kind} asks health for {probe['grpc']['service']!r}, not served here")
        declared = {p["containerPort"] for p in c["ports"]}
        if args.port not in declared:
            problems.append(f"{_name(d)}: gRPC port {args.port} is not a containerPort ({sorted(declared)})")
    return problems


def grace_problems(docs: list[Doc]) -> list[str]:
    """Every service pod may take longer to stop than its service's own shutdown (drain + grace)."""
    problems = []
    for d, pod, c in _containers(docs):
        if c["command"][:2] in (["imgtxt", "serve-image"], ["imgtxt", "serve-text"]):
            cfg = server_config_from_args(parse_container(c))
            needed = cfg.drain_delay_s + cfg.grace_s
        elif c["command"][:2] == ["imgtxt", "serve-search"]:
            needed = SearchServerConfig().grace_s
        else:
            continue
        period = pod.get("terminationGracePeriodSeconds", 30)
        if period <= needed:
            problems.append(f"{_name(d)}: terminationGracePeriodSeconds {period} <= the service's {needed} s stop")
    return problems


def job_problems(docs: list[Doc]) -> list[str]:
    """The indexing Job: Indexed, one shard per completion index, completions = parallelism = --num-shards, and a
    replication factor the Qdrant cluster can hold."""
    problems = []
    jobs = _of_kind(docs, "Job")
    if not jobs:
        return ["no indexing Job"]
    qdrant = [s for s in _of_kind(docs, "StatefulSet") if s["metadata"]["name"] == "qdrant"]
    nodes = qdrant[0]["spec"]["replicas"] if qdrant else 0
    for job in jobs:
        spec, (c,) = job["spec"], job["spec"]["template"]["spec"]["containers"]
        if spec.get("completionMode") != "Indexed":
            problems.append(f"{_name(job)}: completionMode {spec.get('completionMode')}, not Indexed")
        n = spec["completions"]
        if spec.get("parallelism") != n:
            problems.append(f"{_name(job)}: parallelism {spec.get('parallelism')} != completions {n}")
        shards = set()
        for index in range(n):
            args = parse_container(c, {"JOB_COMPLETION_INDEX": str(index)})
            if args.num_shards != n:
                problems.append(f"{_name(job)}: --num-shards {args.num_shards} != completions {n}")
            shards.add(args.shard_index)
            if args.replication_factor and args.replication_factor > nodes:
                problems.append(f"{_name(job)}: --replication-factor {args.replication_factor} > {nodes} Qdrant nodes")
            if not str(args.store).startswith("qdrant://"):
                problems.append(f"{_name(job)}: --store {args.store} is not the Qdrant cluster")
        if shards != set(range(n)):
            problems.append(f"{_name(job)}: completion indexes give shards {sorted(shards)}, not 0..{n - 1}")
        index_env = [e for e in c["env"] if e["name"] == "JOB_COMPLETION_INDEX"]
        ref = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        if not index_env or index_env[0].get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != ref:
            problems.append(f"{_name(job)}: JOB_COMPLETION_INDEX is not the pod's completion index")
    return problems


def image_problems(docs: list[Doc]) -> list[str]:
    """Every image is one of ours at the package version, or the official Qdrant image at a pinned version."""
    problems = []
    for d, _, c in _containers(docs):
        name, _, tag = c["image"].rpartition(":")
        if name in IMGTXT_IMAGES:
            if tag != VERSION:
                problems.append(f"{_name(d)}: {c['image']} is not tagged with the package version {VERSION}")
        elif name == QDRANT_IMAGE:
            if not re.fullmatch(r"v\d+\.\d+\.\d+", tag):
                problems.append(f"{_name(d)}: {c['image']} is not a pinned Qdrant release")
        else:
            problems.append(f"{_name(d)}: image {c['image']} is none of {(*IMGTXT_IMAGES, QDRANT_IMAGE)}")
    return problems


def secret_problems(docs: list[Doc]) -> list[str]:
    """No Secret is shipped, credentials come from Secrets, and TLS files from a Secret volume."""
    problems = [f"{_name(d)}: a Secret in the manifests (create it in the cluster)" for d in _of_kind(docs, "Secret")]
    for d, pod, c in _containers(docs):
        for e in c.get("env", []):
            if e["name"] in SECRET_VARIABLES and "secretKeyRef" not in e.get("valueFrom", {}):
                problems.append(f"{_name(d)}: {e['name']} is not read from a Secret")
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for e in c.get("env", []):
            if e["name"].startswith("IMGTXT_TLS") and "value" in e:
                mount = next((p for p in mounts if e["value"].startswith(p.rstrip("/") + "/")), None)
                if mount is None or "secret" not in volumes.get(mounts[mount], {}):
                    problems.append(f"{_name(d)}: {e['name']}={e['value']} is not on a Secret volume")
    return problems


def bundle_problems(docs: list[Doc]) -> list[str]:
    """The bundle is mounted read-only at /bundle wherever a container reads IMGTXT_BUNDLE."""
    problems = []
    for d, pod, c in _containers(docs):
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        if "IMGTXT_BUNDLE" not in env:
            continue
        mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == env["IMGTXT_BUNDLE"]]
        if env["IMGTXT_BUNDLE"] != "/bundle" or len(mounts) != 1 or not mounts[0].get("readOnly"):
            problems.append(f"{_name(d)}: IMGTXT_BUNDLE={env['IMGTXT_BUNDLE']} is not a read-only mount at /bundle")
            continue
        volume = next(v for v in pod["volumes"] if v["name"] == mounts[0]["name"])
        if "persistentVolumeClaim" in volume and not volume["persistentVolumeClaim"].get("readOnly"):
            problems.append(f"{_name(d)}: the bundle's claim is not mounted readOnly")
    return problems


def wiring_problems(docs: list[Doc]) -> list[str]:
    """Services, autoscalers and disruption budgets find their pods, and every encoder Deployment has all three."""
    problems = []
    workloads = {_name(d): d for d, _ in _pod_specs(docs)}
    pod_labels = [(n, d["spec"]["template"]["metadata"]["labels"]) for n, d in workloads.items()]

    def selects(selector: dict[str, str]) -> list[str]:
        return [n for n, labels in pod_labels if selector.items() <= labels.items()]

    for svc in _of_kind(docs, "Service"):
        if not selects(svc["spec"]["selector"]):
            problems.append(f"{_name(svc)}: its selector matches no pods")
    for pdb in _of_kind(docs, "PodDisruptionBudget"):
        if not selects(pdb["spec"]["selector"]["matchLabels"]):
            problems.append(f"{_name(pdb)}: its selector matches no pods")
    scaled = {
        f"{h['spec']['scaleTargetRef']['kind']}/{h['spec']['scaleTargetRef']['name']}"
        for h in docs
        if h["kind"] == "HorizontalPodAutoscaler"
    }
    problems += [f"HorizontalPodAutoscaler for {t}: no such workload" for t in scaled - workloads.keys()]
    budgets = {
        n for pdb in _of_kind(docs, "PodDisruptionBudget") for n in selects(pdb["spec"]["selector"]["matchLabels"])
    }
    services = {n for svc in _of_kind(docs, "Service") for n in selects(svc["spec"]["selector"])}
    for d, _, c in _containers(docs):
        if c["command"][:2] in (["imgtxt", "serve-image"], ["imgtxt", "serve-text"]):
            for what, have in (
                ("HorizontalPodAutoscaler", scaled),
                ("PodDisruptionBudget", budgets),
                ("Service", services),
            ):
                if _name(d) not in have:
                    problems.append(f"{_name(d)}: no {what}")
    return problems


def device_problems(overlay: str, docs: list[Doc]) -> list[str]:
    """cpu: `--device cpu` and ORT threads that fit the CPU limit; gpu: `--device cuda`, a GPU, batching on."""
    problems = []
    for d, _, c in _containers(docs):
        if c["command"][:2] not in (["imgtxt", "serve-image"], ["imgtxt", "serve-text"]):
            continue
        args, resources = parse_container(c), c.get("resources", {})
        limits, requests = resources.get("limits", {}), resources.get("requests", {})
        if "cpu" not in requests or "memory" not in limits:
            problems.append(f"{_name(d)}: no CPU request or memory limit")
        gpus = int(limits.get("nvidia.com/gpu", 0))
        if getattr(args, "preprocess_threads", None) == 0:  # 0 = one decode thread per core of the node
            problems.append(f"{_name(d)}: image decode threads follow the node's cores, not the CPU limit")
        if overlay == "gpu" and (args.device != "cuda" or gpus < 1 or args.batching != "on"):
            problems.append(f"{_name(d)}: device {args.device}, {gpus} GPU(s), batching {args.batching}")
        if overlay == "cpu":
            if args.device != "cpu" or gpus:
                problems.append(f"{_name(d)}: device {args.device} with {gpus} GPU(s) in the cpu overlay")
            # A CPU quota is no affinity mask: unset threads would follow the node's cores, not the limit.
            threads = args.intra_op_threads * max(1, args.batch_workers)
            if not args.intra_op_threads or not args.batch_workers or threads > float(limits.get("cpu", 0)):
                problems.append(
                    f"{_name(d)}: {args.batch_workers} workers x {args.intra_op_threads} threads"
                    f" vs CPU limit {limits.get('cpu')}"
                )
    return problems


def qdrant_problems(docs: list[Doc]) -> list[str]:
    """A 3-node Qdrant StatefulSet in cluster mode behind a headless Service."""
    sts = [s for s in _of_kind(docs, "StatefulSet") if s["metadata"]["name"] == "qdrant"]
    if len(sts) != 1:
        return ["no qdrant StatefulSet"]
    spec = sts[0]["spec"]
    problems = [] if spec["replicas"] == 3 else [f"qdrant: {spec['replicas']} replicas, not 3"]
    headless = [s for s in _of_kind(docs, "Service") if s["metadata"]["name"] == spec["serviceName"]]
    if not headless or headless[0]["spec"].get("clusterIP") != "None":
        problems.append(f"qdrant: serviceName {spec['serviceName']} is not a headless Service")
    config = next(c for c in _of_kind(docs, "ConfigMap") if c["metadata"]["name"] == "qdrant")
    if not yaml.safe_load(config["data"]["production.yaml"])["cluster"]["enabled"]:
        problems.append("qdrant: cluster mode is off")
    # Its NetworkPolicy admits every pod of ours that uses it, on the gRPC port they use.
    admitted = [
        rule["from"]
        for policy in _of_kind(docs, "NetworkPolicy")
        if policy["spec"]["podSelector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
        for rule in policy["spec"]["ingress"]
        if any(p["port"] == 6334 for p in rule["ports"])
    ]
    for d, _, c in _containers(docs):
        if _env(c).get("IMGTXT_STORE", "").startswith("qdrant://qdrant:6334"):
            labels = d["spec"]["template"]["metadata"]["labels"]
            peers = [p["podSelector"]["matchLabels"] for rule in admitted for p in rule]
            if not any(m.items() <= labels.items() for m in peers):
                problems.append(f"{_name(d)}: uses Qdrant, which its NetworkPolicy does not let it reach")
    return problems


CHECKS: dict[str, Callable[[list[Doc]], list[str]]] = {
    "probes": probe_problems,
    "grace": grace_problems,
    "job": job_problems,
    "images": image_problems,
    "secrets": secret_problems,
    "bundle": bundle_problems,
    "wiring": wiring_problems,
    "qdrant": qdrant_problems,
}


# ---- tests ----


def test_every_manifest_validates_strictly(overlay: tuple[str, list[Doc]]) -> None:
    """Strict schema validation (unknown fields are errors) of every rendered resource."""
    _, docs = overlay
    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{_name(doc)}: {exc.message} at {'/'.join(map(str, exc.path))}")
    assert not errors
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "StatefulSet", "Job"} <= kinds


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_manifests_agree_with_the_services(overlay: tuple[str, list[Doc]], check: str) -> None:
    _, docs = overlay
    assert CHECKS[check](docs) == []


def test_overlay_devices(overlay: tuple[str, list[Doc]]) -> None:
    name, docs = overlay
    assert device_problems(name, docs) == []


def test_images_are_set_in_one_place() -> None:
    """The kustomization's `images:` names exactly our three images (at the package version) and Qdrant's."""
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    images = {i["name"]: i["newTag"] for i in kustomization["images"]}
    assert images == {**dict.fromkeys(IMGTXT_IMAGES, VERSION), QDRANT_IMAGE: images[QDRANT_IMAGE]}


# ---- the checks find what they are for (on broken copies of the cpu overlay) ----


@pytest.fixture(scope="module")
def cpu_docs() -> list[Doc]:
    return render("cpu")


def _first(docs: list[Doc], kind: str, name: str) -> Doc:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _env_set(container: Doc, name: str, value: str) -> None:
    container["env"] = [e for e in container["env"] if e["name"] != name] + [{"name": name, "value": value}]


def test_checks_catch_broken_manifests(cpu_docs: list[Doc]) -> None:
    def broken(change: Callable[[list[Doc]], None]) -> list[Doc]:
        docs = copy.deepcopy(cpu_docs)
        change(docs)
        return docs

    def encoder(docs: list[Doc]) -> Doc:
        return _first(docs, "Deployment", "text-encoder")["spec"]["template"]["spec"]["containers"][0]

    # The service moved to another port, the probes did not.
    assert probe_problems(broken(lambda ds: _env_set(encoder(ds), "IMGTXT_PORT", "6000")))
    # Readiness asks health about the other tower's service.
    assert probe_problems(
        broken(lambda ds: encoder(ds)["readinessProbe"]["grpc"].update(service="imgtxt.v1.ImageEncoder"))
    )
    # A longer drain than the pod's grace period leaves room for.
    assert grace_problems(broken(lambda ds: _env_set(encoder(ds), "IMGTXT_DRAIN_DELAY_S", "40")))
    # A token inlined, a foreign image, a typo in a variable.
    assert secret_problems(broken(lambda ds: _env_set(encoder(ds), "IMGTXT_AUTH_TOKEN", "s3cret")))
    assert image_problems(broken(lambda ds: encoder(ds).update(image="docker.io/library/python:3.11")))
    with pytest.raises(AssertionError, match="IMGTXT_MAX_BATCHES"):
        probe_problems(broken(lambda ds: _env_set(encoder(ds), "IMGTXT_MAX_BATCHES", "8")))
    # More threads than the CPU limit; decode threads left to the node's core count.
    assert device_problems("cpu", broken(lambda ds: _env_set(encoder(ds), "IMGTXT_INTRA_OP_THREADS", "4")))

    def image_encoder(docs: list[Doc]) -> Doc:
        return _first(docs, "Deployment", "image-encoder")["spec"]["template"]["spec"]["containers"][0]

    assert device_problems("cpu", broken(lambda ds: _env_set(image_encoder(ds), "IMGTXT_PREPROCESS_THREADS", "0")))

    def job(docs: list[Doc]) -> Doc:
        return _first(docs, "Job", "index")

    def shards(n: str) -> Callable[[list[Doc]], None]:
        def change(docs: list[Doc]) -> None:
            command = job(docs)["spec"]["template"]["spec"]["containers"][0]["command"]
            command[command.index("--num-shards") + 1] = n

        return change

    assert job_problems(broken(shards("3")))
    # A client of Qdrant that its NetworkPolicy does not admit.
    assert qdrant_problems(broken(lambda ds: job(ds)["spec"]["template"]["metadata"]["labels"].clear()))
    assert job_problems(broken(lambda ds: job(ds)["spec"].update(parallelism=2)))
