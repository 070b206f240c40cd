"""Helpers the service benchmarks share: a free loopback port, and encode calls from several threads at once."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_callers(encode: Callable[[Any], Any], batches: Sequence[Any], callers: int) -> float:
    """Calls `encode(batch)` for every batch from `callers` concurrent threads, each taking the next batch when done
    (at most one thread per batch); returns the seconds it took."""
    pending = iter(batches)
    lock = threading.Lock()

    def caller() -> None:
        while True:
            with lock:
                batch = next(pending, None)
            if batch is None:
                return
            encode(batch)

    threads = [threading.Thread(target=caller) for _ in range(max(1, min(callers, len(batches))))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start
