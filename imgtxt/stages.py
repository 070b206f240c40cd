"""Bounded stages: an iterable drained by its own thread into a closable, cancellable queue that its consumer iterates.

One helper for every producer/consumer pair of the project (the indexing job's read and encode stages, a streamed
rpc's reader, the client's per-modality streams) instead of a poll-with-timeout loop in each:

    batches = stage("read", read_batches(records), maxsize=4)  # a thread runs the generator, 4 items ahead
    for batch in batches:  # the producer's exception is re-raised here
        ...
    batches.cancel()  # the consumer gives up: the producer stops at its next put

Waits are on a condition variable, woken by `put`, `get`, `close` and `cancel`: nothing sleeps to poll.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Channel(Generic[T]):
    """A FIFO between a producer and a consumer thread, bounded by `maxsize` items (0 = unbounded).

    The producer `put`s and finally `close`s (optionally with the exception that ended it); the consumer iterates
    and sees every item, then the end (or the producer's exception). Either side may `cancel`: pending and future
    `put`s return False and iteration stops at once, so neither side is left blocked.
    """

    def __init__(self, maxsize: int = 0) -> None:
        if maxsize < 0:
            raise ValueError(f"maxsize must be >= 0, got {maxsize}")
        self.maxsize = maxsize
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._cancelled = False
        self._error: BaseException | None = None

    @property
    def cancelled(self) -> bool:
        """Whether either side cancelled."""
        with self._cond:
            return self._cancelled

    def put(self, item: T) -> bool:
        """Appends an item, waiting while the channel is full; False (item dropped) once cancelled.

        Raises:
            RuntimeError: The channel was closed by its producer.
        """
        with self._cond:
            while not self._cancelled and self.maxsize and len(self._items) >= self.maxsize:
                self._cond.wait()
            if self._cancelled:
                return False
            if self._closed:
                raise RuntimeError("put on a closed channel")
            self._items.append(item)
            self._cond.notify_all()
            return True

    def close(self, error: BaseException | None = None) -> None:
        """The producer is done; the consumer gets the remaining items, then the end (or `error`, raised)."""
        with self._cond:
            self._closed = True
            self._error = error
            self._cond.notify_all()

    def cancel(self) -> None:
        """Stops both sides: queued items are dropped, `put` returns False, iteration ends."""
        with self._cond:
            self._cancelled = True
            self._items.clear()
            self._cond.notify_all()

    def __iter__(self) -> Iterator[T]:
        while True:
            with self._cond:
                while not self._items and not self._closed and not self._cancelled:
                    self._cond.wait()
                if self._cancelled:
                    return
                if self._items:
                    item = self._items.popleft()
                    self._cond.notify_all()
                elif self._error is not None:
                    raise self._error
                else:
                    return
            yield item


def stage(name: str, items: Iterable[T], maxsize: int = 0) -> Channel[T]:
    """Drains `items` in a daemon thread named `name` into a new channel of `maxsize` and returns the channel.

    The thread stops when `items` is exhausted (the channel closes), raises (the consumer re-raises the exception)
    or the channel is cancelled (a generator is then closed, running its `finally` blocks).
    """
    channel: Channel[T] = Channel(maxsize)

    def run() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not channel.put(item):
                    break
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            channel.close(exc)
        else:
            channel.close()
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    threading.Thread(target=run, name=name, daemon=True).start()
    return channel
