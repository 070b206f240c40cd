"""The request path shared by both services, and the servicer base that turns it into the three rpcs.

`EncodeService` is transport-agnostic (limits, preprocessing, batched run, per-item outcomes, metrics); the servicer
base only converts messages. The image and text servicers add nothing but "which field holds the items".
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

import grpc
import numpy as np

from imgtxt.encoders.tower import Prepared, TowerEncoder
from imgtxt.encoders.types import EncodeResult
from imgtxt.errors import InvalidInput
from imgtxt.serving.batcher import Runner
from imgtxt.serving.prometheus import ServiceMetrics
from imgtxt.serving.tuning import BatchingPlan
from imgtxt.stages import stage
from imgtxt.v1 import encoder_pb2 as pb
from imgtxt.wire import to_info_response, to_response

ItemT = TypeVar("ItemT")


class PendingEncode:
    """A request whose items are prepared and queued for the session; `result()` waits for its embeddings."""

    def __init__(self, prepared: Prepared[Any], future: Future[np.ndarray] | None, dim: int, metrics: ServiceMetrics):
        self._prepared = prepared
        self._future = future
        self._dim = dim
        self._metrics = metrics

    def done(self) -> bool:
        """Whether `result()` would return without waiting."""
        return self._future is None or self._future.done()

    def result(self) -> EncodeResult:
        """The request's embeddings and per-item outcomes.

        Raises:
            Exception: Whatever the session run raised (mapped to INTERNAL).
        """
        rows = self._future.result() if self._future is not None else np.zeros((0, self._dim), np.float32)
        result = self._prepared.assemble(rows, self._dim)
        self._metrics.count_items([int(o.code) for o in result.outcomes])
        return result


class EncodeService(Generic[ItemT]):
    """Checks a request against the limits, preprocesses it in the caller's thread, and queues it for the session."""

    def __init__(
        self,
        encoder: TowerEncoder[ItemT, Any],
        runner: Runner,
        metrics: ServiceMetrics,
        max_batch: int,
        batching: BatchingPlan | None = None,
    ):
        self.encoder = encoder
        self.runner = runner
        self.metrics = metrics
        self.max_batch = max_batch
        self.batching = batching
        """How the runner was chosen (reported by `Info`); None when built without a plan."""

    def submit(self, items: Sequence[ItemT], wait: Callable[[], bool] | None = None) -> PendingEncode:
        """Prepares the items and queues the good ones.

        Args:
            items: The request's items.
            wait: Passed to the runner: wait for room in a full queue while it returns True (streams).

        Raises:
            InvalidInput: More than `max_batch` items.
            Overloaded: The queue is full.
        """
        if len(items) > self.max_batch:
            raise InvalidInput(f"request has {len(items)} items, over the limit max_batch={self.max_batch}")
        start = time.perf_counter()
        # Preprocessing runs here, in the rpc's own thread, so requests decode in parallel while the batcher runs.
        prepared = self.encoder.prepare(items)
        self.metrics.observe_stage("preprocess", time.perf_counter() - start)
        good = prepared.good
        future = self.runner.submit(good, wait) if good else None
        return PendingEncode(prepared, future, self.encoder.dim, self.metrics)

    def encode(self, items: Sequence[ItemT]) -> EncodeResult:
        """`submit` and wait."""
        return self.submit(items).result()


class EncoderServicerBase(Generic[ItemT]):
    """Encode, EncodeStream and Info over an `EncodeService`; subclasses say how to read a request's items."""

    def __init__(self, service: EncodeService[ItemT], max_message_bytes: int, stream_window: int) -> None:
        self.service = service
        self.max_message_bytes = max_message_bytes
        self.stream_window = stream_window
        self.bundle_version = service.encoder.bundle.version

    @abstractmethod
    def _items(self, request: Any) -> list[ItemT]:
        """The items of a request, in order."""

    def _respond(self, pending: PendingEncode, request: Any) -> pb.EncodeResponse:
        return to_response(pending.result(), [item.id for item in request.items], self.bundle_version)

    def Encode(self, request: Any, context: grpc.ServicerContext) -> pb.EncodeResponse:
        """One batch in, its embeddings out."""
        return self._respond(self.service.submit(self._items(request)), request)

    def EncodeStream(
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[pb.EncodeResponse]:
        """Chunks in, one response per chunk out, in order.

        A reader thread takes chunks from the client, preprocesses and queues them while earlier chunks run; at most
        `stream_window` chunks wait for their answer, beyond which the reader stops reading and gRPC flow control
        pushes back on the client. Each answer goes out as soon as it is ready, so a client that waits for one
        response before sending the next chunk works as well as one that sends ahead.
        """

        def submitted() -> Iterator[tuple[PendingEncode, Any]]:
            for request in request_iterator:
                # A full queue makes a stream wait (backpressure through flow control) instead of failing it.
                yield self.service.submit(self._items(request), wait=context.is_active), request

        # The reader runs ahead by at most `stream_window` chunks; a cancelled or finished rpc cancels it.
        window = stage("stream-reader", submitted(), self.stream_window)
        context.add_callback(window.cancel)
        for pending, request in window:
            yield self._respond(pending, request)

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        """Bundle, provider, precision, batching and limits, and the bundle's serving decisions an indexer follows."""
        service = self.service
        response = to_info_response(service.encoder.info, service.max_batch, self.max_message_bytes, service.batching)
        serving = service.encoder.bundle.manifest.serving
        response.quantization = serving.quantization
        response.unit_head = serving.unit_provenance
        return response
