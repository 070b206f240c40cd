"""How a service runs its session on the hardware it finds: batched or not, batch workers, ORT intra-op threads.

`choose_batching` is the rule (a pure function of a `Hardware` description); `plan_batching` applies it to the
`--batching auto|on|off`, `--batch-workers` and `--intra-op-threads` flags, where `on`/`off` override it (loudly).

Why the rule is what it is (measured with `benchmarks/services_batching.py`; figures in
`benchmarks/results/services_batching_*.md`):

- **Batching that never costs (text tower, accelerators): dynamic batching that runs a request alone when the
  service is idle.** A request that finds no run in flight and no one waiting runs at once in its rpc's thread (no
  wait for company, no hand-off between threads); requests that arrive while a run is in flight queue and are
  coalesced. On the 2-core test machine, plain batching served one client 0.6-0.85x of batching off's throughput
  (the wait for company and the hand-off), and 32 text clients 1.67x: which mode wins depends on the load, and this
  one matched the better of the two at both (default bundle: 1.00x at 1 client, where it runs every request alone,
  the path of batching off; 1.00x at 32), within the benchmark's resolution of about +-10 %.
- **CPU, image tower: batching off.** A convolutional tower's batch-1 runs already fill a CPU's cores: the model
  alone, batch 32 from 2 callers gave 0.77x (default recipe, EfficientNet-Lite2 at int8) and 0.92x (quick,
  Lite0) of batch 1 from 32 callers, against 2.14x for the text tower, and on the default bundle batching on
  served 32 image clients 0.85x of batching off.
- **CPU, text tower: `CPU_BATCH_WORKERS` run slots** sharing the cores (cores / slots intra-op threads each): one run
  computes while the other's batch is collated or its answers handed back.
- **CUDA (any accelerator provider): one run slot.** One item leaves a GPU idle, so it gains most from batches; the
  device runs one batch at a time, so a second slot would only halve the batches.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from imgtxt.encoders.session import CPU, available_cores
from imgtxt.errors import ConfigError

logger = logging.getLogger(__name__)

BATCHING_MODES = ("auto", "on", "off")
CPU_BATCH_WORKERS = 2
"""Session runs the cores are split between when batching is on on a CPU and neither `--batch-workers` nor
`--intra-op-threads` is set. One run computes while the other's batch is collated or its answers handed back, and each
run synchronises half the intra-op threads. On 2 cores (text tower, 32 clients, short runs of
`benchmarks/services_batching.py` with `--server-flags '--batching on --batch-workers N'`), 2 workers of 1 thread
each served about 1.3x what 1 worker of 2 threads did."""


@dataclass(frozen=True)
class Hardware:
    """What the batching rule looks at."""

    cores: int
    """CPU cores the process may run on (affinity-aware)."""
    provider: str
    """ONNX Runtime execution provider the session runs (or will run) on."""
    tower: str
    """`image` or `text`."""

    def __post_init__(self) -> None:
        if self.cores < 1:
            raise ConfigError(f"cores must be >= 1, got {self.cores}")

    @classmethod
    def here(cls, provider: str, tower: str) -> Hardware:
        """This host's cores, with the given provider and tower."""
        return cls(available_cores(), provider, tower)


@dataclass(frozen=True)
class BatchingPlan:
    """How a service runs its session: what the rule (or a flag) decided, and why."""

    batching: bool
    """Coalesce concurrent requests into session runs (off: each request runs alone, in its rpc's thread)."""
    batch_workers: int
    """With batching: session runs in flight at once, each in its own thread (0 with batching off)."""
    intra_op_threads: int
    """ORT threads inside one operator of one session run."""
    reason: str
    """Why: the rule's reason, or the flag that overrode it."""
    source: str = "auto"
    """`auto` (the rule decided) or `flag` (`--batching on|off` decided)."""
    run_alone_when_idle: bool = False
    """With batching: a request finding the service idle (no run in flight, queue empty) runs at once, alone, in its
    rpc's thread (`DynamicBatcher`'s `run_alone_when_idle`); `batch_workers` bounds the runs of both kinds."""

    @property
    def mode(self) -> str:
        """`adaptive` (batching that runs a request alone when the service is idle), `on` or `off`."""
        if not self.batching:
            return "off"
        return "adaptive" if self.run_alone_when_idle else "on"


def choose_batching(hw: Hardware) -> BatchingPlan:
    """The rule: on an accelerator, dynamic batching with one run slot that runs a request alone when the service is
    idle; on a CPU, the same with `CPU_BATCH_WORKERS` run slots sharing the cores for the text tower, and batching off
    for the image tower.

    Args:
        hw: Cores, provider and tower of the service.

    Returns:
        The plan, with its reason.
    """
    if hw.provider != CPU:
        return BatchingPlan(
            batching=True,
            batch_workers=1,
            intra_op_threads=max(1, hw.cores // CPU_BATCH_WORKERS),
            reason=f"{hw.provider}: an accelerator gains from batches; one device runs one batch at a time, so one "
            "run slot; a request arriving while the service is idle runs at once",
            run_alone_when_idle=True,
        )
    if hw.tower == "image":
        return BatchingPlan(
            batching=False,
            batch_workers=0,
            intra_op_threads=max(1, hw.cores - 1),
            reason=f"{CPU} on {hw.cores} core(s), image tower: a convolutional tower gains little from batches on a "
            "CPU (its batch-1 runs already fill the cores), so each request runs alone, in its rpc's thread",
        )
    slots = min(CPU_BATCH_WORKERS, hw.cores)
    return BatchingPlan(
        batching=True,
        batch_workers=slots,
        intra_op_threads=max(1, hw.cores // slots),
        reason=f"{CPU} on {hw.cores} core(s), {hw.tower} tower: {slots} run slot(s) sharing the cores; a request that "
        "finds the service idle runs at once, alone (as with batching off), those arriving while a run is in flight "
        "are coalesced (as with batching on)",
        run_alone_when_idle=True,
    )


def plan_batching(mode: str, hw: Hardware, batch_workers: int = 0, intra_op_threads: int = 0) -> BatchingPlan:
    """The plan `--batching MODE` gives on `hw`, with `--batch-workers` / `--intra-op-threads` where set (non-zero).

    `auto` is `choose_batching`; `on` (always coalesce, waiting up to `--max-delay-us` for company) and `off` (each
    request alone) override it. With batching and neither count set, the cores are split between `CPU_BATCH_WORKERS`
    runs on a CPU (one run on an accelerator); with one count set, the other fills the cores. With batching off, each
    request's run gets cores - 1 threads (one core's worth of time stays for decoding, tokenizing and gRPC).

    Raises:
        ConfigError: Unknown mode, or negative counts.
    """
    if mode not in BATCHING_MODES:
        raise ConfigError(f"batching must be one of {BATCHING_MODES}, got {mode!r}")
    if batch_workers < 0 or intra_op_threads < 0:
        raise ConfigError(
            f"batch_workers and intra_op_threads must be >= 0 (0: automatic), got {batch_workers}, {intra_op_threads}"
        )
    auto = choose_batching(hw)
    if mode == "auto":
        chosen = auto
    else:
        chosen = BatchingPlan(
            batching=mode == "on",
            batch_workers=0,
            intra_op_threads=0,
            reason=f"--batching {mode} (flag; the rule would choose: {auto.reason})",
            source="flag",
        )
    if not chosen.batching:
        threads = intra_op_threads or max(1, hw.cores - 1)
        return dataclasses.replace(chosen, batch_workers=0, intra_op_threads=threads)
    if hw.provider != CPU:
        workers = batch_workers or 1
        threads = intra_op_threads or max(1, hw.cores // CPU_BATCH_WORKERS)
    else:
        threads = intra_op_threads or max(1, hw.cores // (batch_workers or CPU_BATCH_WORKERS))
        workers = batch_workers or max(1, hw.cores // threads)
    return dataclasses.replace(chosen, batch_workers=workers, intra_op_threads=threads)


def log_plan(plan: BatchingPlan, tower: str) -> None:
    """Logs the plan: at info when the rule decided, as a warning when a flag overrode it."""
    extra = {
        "modality": tower,
        "batching": plan.mode,
        "run_alone_when_idle": plan.run_alone_when_idle,
        "batch_workers": plan.batch_workers,
        "intra_op_threads": plan.intra_op_threads,
        "reason": plan.reason,
    }
    if plan.source == "flag":
        logger.warning("batching %s set by flag, overriding the automatic choice", plan.mode, extra=extra)
    else:
        logger.info("batching %s (automatic)", plan.mode, extra=extra)
