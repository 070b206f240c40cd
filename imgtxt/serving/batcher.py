"""Dynamic batching: concurrent requests' prepared items are coalesced into session runs, in arrival order.

`workers` threads own the session runs (one run each at a time, on the one shared session). An idle worker takes the
oldest waiting request, which opens a batch; it closes when it holds `max_batch` items or `max_delay_us` has passed
since that request arrived, whichever comes first. While the workers run their batches, the next ones fill, so under
load batches grow by themselves and the delay is rarely waited in full.

With `run_alone_when_idle` (what `--batching auto` runs), a request that finds the service idle (no run in flight, no
one waiting) and lightly loaded (the last coalesced run held a single request) runs at once, alone, in its caller's
thread (no wait for company, no hand-off between threads: what batching off does); every other request, and every
stream chunk (whose reader thread goes on preprocessing the next one meanwhile), queues and is coalesced by the
workers, as before. A lone client then pays nothing for batching, and a loaded service batches as
much as the load allows: under load, the first request after a lull would otherwise run as a batch of one while its
company arrives, and batch-1 runs use a CPU's cores worst.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from imgtxt.errors import Overloaded
from imgtxt.serving.interceptors import ServerStopping
from imgtxt.serving.prometheus import ServiceMetrics

logger = logging.getLogger(__name__)

RunFn = Callable[[Sequence[Any]], np.ndarray]


class Runner(Protocol):
    """Runs prepared features through the session: either coalesced (`DynamicBatcher`) or alone (`InlineRunner`)."""

    def submit(self, features: Sequence[Any], wait: Callable[[], bool] | None = None) -> Future[np.ndarray]:
        """Queues one request's features; the future gets their (n, D) embeddings, in order.

        Args:
            features: Prepared items of one request.
            wait: When the queue is full, keep waiting for room while this returns True (streams: backpressure)
                instead of raising Overloaded at once (unary requests: load shedding).
        """
        ...

    def close(self) -> None:
        """Finishes queued work and stops."""
        ...


class InlineRunner:
    """No batching: each request runs alone, in its caller's thread (the session is thread-safe)."""

    def __init__(self, run: RunFn, metrics: ServiceMetrics) -> None:
        self._run = run
        self._metrics = metrics

    def submit(self, features: Sequence[Any], wait: Callable[[], bool] | None = None) -> Future[np.ndarray]:
        """Runs the features now and returns a completed future (there is no queue to wait for)."""
        future: Future[np.ndarray] = Future()
        start = time.perf_counter()
        try:
            future.set_result(self._run(features))
        except Exception as exc:
            future.set_exception(exc)
        self._metrics.observe_stage("inference", time.perf_counter() - start)
        self._metrics.observe_batch(len(features))
        return future

    def close(self) -> None:
        """Nothing to stop."""


@dataclass
class _Pending:
    features: Sequence[Any]
    future: Future[np.ndarray] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """Coalesces concurrent requests into session runs of at most `max_batch` items; bounded queue."""

    def __init__(
        self,
        run: RunFn,
        metrics: ServiceMetrics,
        max_batch: int,
        max_delay_us: int,
        max_queue: int,
        workers: int = 1,
        run_alone_when_idle: bool = False,
    ) -> None:
        """Starts the worker threads.

        Args:
            run: One session run over a list of prepared features, returning (n, D) embeddings (thread-safe when
                `workers` > 1).
            metrics: Where batch sizes, queue depth and stage times go.
            max_batch: Most items per run (one request never exceeds it: the servicer checks).
            max_delay_us: How long a batch's first request waits for company.
            max_queue: Most items waiting; beyond it `submit` raises Overloaded.
            workers: Session runs in flight at once, each in its own thread.
            run_alone_when_idle: A request finding the queue empty, no run in flight and the last coalesced run of
                a single request runs at once in the caller's thread instead of queueing (`workers` then bounds the
                runs of both kinds).
        """
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._run = run
        self._metrics = metrics
        self.workers = workers
        self.max_batch = max_batch
        self.max_delay = max_delay_us / 1e6
        self.max_queue = max_queue
        self._pending: deque[_Pending] = deque()
        self._depth = 0
        self._closed = False
        self._waiting = 0
        self.run_alone_when_idle = run_alone_when_idle
        self._running = 0  # session runs in flight (batches, and requests run alone)
        self._light = True  # the last coalesced run held one request: the load is light
        self._cond = threading.Condition()
        self._depth_gauge = metrics.labels(metrics.queue_depth)
        self._threads = [threading.Thread(target=self._loop, name=f"batcher-{k}", daemon=True) for k in range(workers)]
        for thread in self._threads:
            thread.start()

    @property
    def depth(self) -> int:
        """Items waiting for a run."""
        with self._cond:
            return self._depth

    @property
    def waiting(self) -> int:
        """Submitters blocked on a full queue (streams under backpressure)."""
        with self._cond:
            return self._waiting

    def submit(self, features: Sequence[Any], wait: Callable[[], bool] | None = None) -> Future[np.ndarray]:
        """Queues one request's features.

        Args:
            features: Prepared items of one request.
            wait: When the queue is full, keep waiting for room while this returns True (checked every 0.5 s and
                whenever a batch leaves the queue) instead of raising Overloaded at once.

        Raises:
            Overloaded: The queue holds `max_queue` items already (and `wait` is None or returned False).
            ServerStopping: The batcher is closed (the server is stopping).
        """
        item = _Pending(features)
        # Stream chunks (`wait` given) always queue: their reader thread goes on preprocessing the next chunk.
        if self.run_alone_when_idle and wait is None and self._claim_idle_slot():
            return self._run_alone(item)
        with self._cond:
            while not self._closed and self._depth + len(features) > self.max_queue and wait is not None and wait():
                self._waiting += 1
                self._cond.wait(0.5)
                self._waiting -= 1
            if self._closed:
                raise ServerStopping("server is shutting down; retry (another replica, or this one once restarted)")
            if self._depth + len(features) > self.max_queue:
                raise Overloaded(
                    f"queue is full: {self._depth} items waiting, limit max_queue={self.max_queue}; retry later"
                )
            item.enqueued = time.perf_counter()
            self._pending.append(item)
            self._depth += len(features)
            self._depth_gauge.set(self._depth)
            self._cond.notify()
        return item.future

    def _claim_idle_slot(self) -> bool:
        with self._cond:
            if self._closed or self._pending or self._running or not self._light:
                return False
            self._running += 1
            return True

    def _release_slot(self) -> None:
        with self._cond:
            self._running -= 1
            if self._pending:
                self._cond.notify_all()  # a worker may be waiting for this slot (and submitters share the condition)

    def _run_alone(self, item: _Pending) -> Future[np.ndarray]:
        start = time.perf_counter()
        try:
            item.future.set_result(self._run(item.features))
        except Exception as exc:  # handed to the caller, whose error mapping logs it
            item.future.set_exception(exc)
        finally:
            self._release_slot()
        self._metrics.observe_stage("inference", time.perf_counter() - start)
        self._metrics.observe_batch(len(item.features))
        return item.future

    def _next_batch(self) -> list[_Pending] | None:
        with self._cond:
            # Every idle worker waits here; whichever wakes once the oldest request's batch is due takes it (another
            # worker may have taken it meanwhile: then the head, and its deadline, are new).
            while True:
                if not self._pending:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                if self._running >= self.workers:  # every slot is busy (a request alone among them): wait
                    self._cond.wait()
                    continue
                left = self._pending[0].enqueued + self.max_delay - time.perf_counter()
                if self._depth >= self.max_batch or self._closed or left <= 0:
                    break
                self._cond.wait(left)
            batch: list[_Pending] = []
            size = 0
            while self._pending and size + len(self._pending[0].features) <= self.max_batch:
                p = self._pending.popleft()
                batch.append(p)
                size += len(p.features)
            if not batch:  # a request larger than max_batch (the servicer prevents it) still runs, alone
                batch.append(self._pending.popleft())
            self._depth -= sum(len(p.features) for p in batch)
            self._depth_gauge.set(self._depth)
            self._running += 1
            self._light = len(batch) == 1
            if self._waiting:
                self._cond.notify_all()  # room for blocked stream chunks
            elif self._pending:
                self._cond.notify()  # what is left is another idle worker's next batch
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            start = time.perf_counter()
            for p in batch:
                self._metrics.observe_stage("queue", start - p.enqueued)
            features = [f for p in batch for f in p.features]
            try:
                rows = self._run(features)
            except Exception as exc:  # handed to each caller, whose error mapping logs it
                for p in batch:
                    p.future.set_exception(exc)
                continue
            finally:
                self._release_slot()
                self._metrics.observe_stage("inference", time.perf_counter() - start)
            self._metrics.observe_batch(len(features))
            offset = 0
            for p in batch:
                p.future.set_result(rows[offset : offset + len(p.features)])
                offset += len(p.features)

    def close(self, timeout: float | None = None) -> None:
        """Refuses new work, runs what is queued, and stops the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
