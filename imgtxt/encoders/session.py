"""ONNX Runtime session factory: provider selection (CUDA first, CPU fallback), thread counts, optimised-model cache."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from imgtxt.bundle import ServingSpec
from imgtxt.errors import ConfigError

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
# `auto`: fp16 where the session runs on CUDA and the bundle has fp16 graphs; on CPU, int8 where the bundle proves it
# safe (its export recorded a val rSum loss of at most INT8_MAX_RSUM_LOSS for the tower); fp32 otherwise.
PRECISION_CHOICES = ("auto", "fp32", "fp16", "int8")
INT8_MAX_RSUM_LOSS = 0.5
"""Largest val rSum loss (against fp32, measured by `imgtxt export --int8`) at which `--precision auto` serves a tower's
int8 graph on CPU."""
OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class DeviceUnavailable(ConfigError):
    """The operator demanded a device (`--device cuda`) that ONNX Runtime cannot use here."""


def available_cores() -> int:
    """CPU cores this process may run on (respects affinity masks and container cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_cache_dir() -> Path:
    """Where optimised models are cached: `$XDG_CACHE_HOME/imgtxt/ort` (default `~/.cache/imgtxt/ort`)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "imgtxt" / "ort"


@dataclass(frozen=True)
class SessionConfig:
    """How an ONNX Runtime session is built."""

    device: str = "auto"
    """`auto` (CUDA when it loads, else CPU), `cpu`, or `cuda` (fail at start when CUDA is not usable)."""
    intra_op_threads: int = 0
    """Threads inside one operator; 0 = available cores - 1 (at least 1): one core's worth of time stays free for
    decoding, tokenizing and gRPC, which a busy ORT thread pool would otherwise preempt (its parallel loops then wait
    for the preempted thread)."""
    inter_op_threads: int = 1
    """Threads running independent operators in parallel (sequential execution when 1)."""
    optimization: str = "all"
    """Graph optimisation level: disable, basic, extended or all."""
    cache_dir: Path | None = None
    """Directory of cached optimised models (keyed by bundle sha256 and provider); None = no caching."""
    allow_spinning: bool = False
    """Let idle ORT worker threads busy-wait for work: lowest latency when ORT has the cores to itself, but in a
    server the spinning steals CPU from the threads that decode and tokenize the next requests."""

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.optimization not in OPTIMIZATION_LEVELS:
            raise ConfigError(f"optimization must be one of {tuple(OPTIMIZATION_LEVELS)}, got {self.optimization!r}")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ConfigError(f"thread counts must be >= 0, got {self.intra_op_threads}, {self.inter_op_threads}")

    @property
    def resolved_intra_op_threads(self) -> int:
        """The intra-op thread count actually used."""
        return self.intra_op_threads or max(1, available_cores() - 1)


def cuda_available() -> bool:
    """Whether this ONNX Runtime build offers the CUDA provider (it may still fail to load its libraries)."""
    return CUDA in ort.get_available_providers()


def expected_provider(device: str) -> str:
    """The provider a session on `device` is expected to run on, before it exists (CUDA may still fail to load)."""
    return CUDA if device != "cpu" and cuda_available() else CPU


@dataclass(frozen=True)
class PrecisionChoice:
    """Which graph precision a tower is served at, and why."""

    precision: str
    """`fp32`, `fp16` or `int8`."""
    reason: str
    """Why, in words (logged and reported in `Info`)."""
    source: str = "auto"
    """`auto` (decided from the bundle and the provider) or `flag` (`--precision` named it)."""


def choose_precision(requested: str, modality: str, serving: ServingSpec, provider: str) -> PrecisionChoice:
    """The precision `--precision requested` serves `modality` at, on `provider`.

    `auto` takes fp16 on CUDA when the bundle has it, int8 on CPU when the bundle's int8 graph of the tower has a
    recorded val rSum loss of at most `INT8_MAX_RSUM_LOSS`, and fp32 otherwise. Any other value is served as given
    (the bundle must have it).

    Raises:
        ConfigError: Unknown precision.
    """
    if requested not in PRECISION_CHOICES:
        raise ConfigError(f"precision must be one of {PRECISION_CHOICES}, got {requested!r}")
    if requested != "auto":
        return PrecisionChoice(requested, f"--precision {requested} (flag)", "flag")
    if provider == CUDA:
        if modality in serving.precisions.get("fp16", {}):
            return PrecisionChoice("fp16", "auto: CUDA, and the bundle has an fp16 graph")
        return PrecisionChoice("fp32", "auto: CUDA, and the bundle has no fp16 graph")
    int8 = serving.precisions.get("int8", {}).get(modality)
    if int8 is None:
        return PrecisionChoice("fp32", "auto: the bundle has no int8 graph")
    check = int8.retrieval
    if check is None:
        return PrecisionChoice(
            "fp32", "auto: the int8 graph has no recorded val rSum check (re-export with `imgtxt export --int8`)"
        )
    loss = check.rsum_loss
    verdict = "<=" if loss <= INT8_MAX_RSUM_LOSS else ">"
    reason = (
        f"auto: int8 {'loses' if loss >= 0 else 'gains'} {abs(loss):.2f} {check.split} rSum ({check.images} images, "
        f"{check.fp32_rsum:.2f} at fp32; loss "
        f"{loss:+.2f} {verdict} {INT8_MAX_RSUM_LOSS})"
    )
    return PrecisionChoice("int8" if loss <= INT8_MAX_RSUM_LOSS else "fp32", reason)


def _requested_providers(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if CUDA not in available:
        if device == "cuda":
            raise DeviceUnavailable(
                f"--device cuda: this ONNX Runtime build has no CUDA provider (available: {available}); "
                "install onnxruntime-gpu or use --device auto/cpu"
            )
        return [CPU]
    return [CUDA, CPU]


def _session_options(cfg: SessionConfig, level: ort.GraphOptimizationLevel) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.intra_op_num_threads = cfg.resolved_intra_op_threads
    so.inter_op_num_threads = max(cfg.inter_op_threads, 1)
    so.execution_mode = ort.ExecutionMode.ORT_PARALLEL if cfg.inter_op_threads > 1 else ort.ExecutionMode.ORT_SEQUENTIAL
    # ORT's own logs (e.g. the CUDA library failing to load) are errors only; our logs say what was chosen.
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if cfg.allow_spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if cfg.allow_spinning else "0")
    return so


def create_session(model_path: str | Path, cfg: SessionConfig, cache_key: str = "") -> ort.InferenceSession:
    """Builds one InferenceSession (thread-safe; `run()` releases the GIL, so one per process is enough).

    With a cache directory and a cache key (the bundle sha256), the graph optimised for the active provider is saved
    on first start and loaded on later starts, skipping the optimisation passes.

    Args:
        model_path: The ONNX file.
        cfg: Device, threads, optimisation and cache settings.
        cache_key: Identity of the model's contents (e.g. bundle sha256 + file name); empty disables caching.

    Raises:
        DeviceUnavailable: `device="cuda"` and the CUDA provider did not load.
    """
    model_path = Path(model_path)
    providers = _requested_providers(cfg.device)
    # With `auto`, a CUDA provider that fails to load is expected on CPU hosts: ORT's default logger would print its
    # loader error on every start, so it is silenced and our own warning says which provider runs. With `cuda`, the
    # loader error is the operator's diagnosis and stays visible.
    ort.set_default_logger_severity(4 if cfg.device == "auto" else 3)
    level = OPTIMIZATION_LEVELS[cfg.optimization]
    cache_dir: Path | None = None
    if cfg.cache_dir is not None and cache_key and cfg.optimization != "disable":
        cache_dir = Path(cfg.cache_dir) / cache_key
    # Cached graphs are named `<model>.<device>.<level>.<provider it was optimised for>.onnx`: graphs optimised at
    # the `all` level may hold provider-specific fused nodes, and with `auto` the provider is only known afterwards.
    stem = f"{model_path.stem}.{cfg.device}.{cfg.optimization}"
    hits = sorted(cache_dir.glob(f"{stem}.*.onnx")) if cache_dir is not None else []
    if hits:
        cached = hits[0]
        session = ort.InferenceSession(
            str(cached), _session_options(cfg, ort.GraphOptimizationLevel.ORT_DISABLE_ALL), providers=providers
        )
        built_for = cached.suffixes[-2].lstrip(".") if len(cached.suffixes) >= 2 else ""
        if built_for != active_provider(session):
            logger.warning(
                "cached optimised model was built for another provider; clear the cache to re-optimise",
                extra={"path": str(cached), "provider": active_provider(session)},
            )
        logger.info("loaded cached optimised model", extra={"path": str(cached)})
    else:
        so = _session_options(cfg, level)
        tmp: str | None = None
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            # Written under a temporary name and renamed, so concurrent starts never read a half-written file.
            fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=cache_dir)
            os.close(fd)
            so.optimized_model_filepath = tmp
        try:
            session = ort.InferenceSession(str(model_path), so, providers=providers)
            if tmp is not None and cache_dir is not None:
                final = cache_dir / f"{stem}.{active_provider(session)}.onnx"
                os.replace(tmp, final)
                logger.info("cached optimised model", extra={"path": str(final)})
        except BaseException:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
            raise
    active = session.get_providers()[0]
    if cfg.device == "cuda" and active != CUDA:
        raise DeviceUnavailable(
            f"--device cuda: the CUDA execution provider failed to load (session runs on {active}); check the CUDA "
            "and cuDNN libraries ONNX Runtime needs, or use --device auto/cpu"
        )
    if cfg.device == "auto" and CUDA in providers and active != CUDA:
        logger.warning("CUDA execution provider did not load; running on CPU", extra={"model": model_path.name})
    return session


def active_provider(session: ort.InferenceSession) -> str:
    """The execution provider the session actually runs on (the first one that loaded)."""
    return str(session.get_providers()[0])
