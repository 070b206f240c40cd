"""Server interceptors: the ONE place exceptions become gRPC status codes, the admission gate of a stopping server,
bearer-token auth, and the check of requests that failed to parse.

Order on the server (outermost first, as `imgtxt.serving.shell.ServerShell` installs them): `ErrorMappingInterceptor`,
`AdmissionGate`, `AuthInterceptor`, `RequestCheckInterceptor`. The inner ones raise domain exceptions into the first
rather than aborting rpcs themselves; the request check is innermost so that auth is decided before the request's
content is judged (a caller without a token gets UNAUTHENTICATED, whatever it sent).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from imgtxt.errors import ImgTxtError, InvalidInput, LimitExceeded, Overloaded, Unauthenticated, WrongSpace
from imgtxt.serving.auth import TokenChecker

logger = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"


class ServerStopping(ImgTxtError):
    """The server is shutting down and takes no new rpcs (maps to UNAVAILABLE: the client retries, elsewhere)."""


# Most specific first: LimitExceeded and InvalidInput are both ValueErrors, but no plain ValueError is mapped (a
# ValueError from our own code is a bug, answered INTERNAL).
_STATUS_OF: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (ServerStopping, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (WrongSpace, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
)


def status_of(exc: Exception) -> grpc.StatusCode | None:
    """The status code of a domain exception; None for anything else (a bug: INTERNAL)."""
    for cls, code in _STATUS_OF:
        if isinstance(exc, cls):
            return code
    return None


Wrap = Callable[[Callable[..., Any], bool], Callable[..., Any]]


def _wrap_handler(
    handler: grpc.RpcMethodHandler,
    wrap: Wrap,
    wrap_deserializer: Callable[[Any], Any] = lambda deserialize: deserialize,
) -> grpc.RpcMethodHandler:
    """Rebuilds a method handler with its behaviour wrapped (`wrap(fn, streaming_response)`) and, optionally, its
    request deserializer."""
    kinds = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    for attr, make in kinds.items():
        fn = getattr(handler, attr)
        if fn is not None:
            return make(  # type: ignore[no-any-return]
                wrap(fn, attr.endswith("_stream")),
                request_deserializer=wrap_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
    return handler


class _Unparsable:
    """Stands in for a request message that failed to deserialize, so the handler (not gRPC) answers it."""

    def __init__(self, data: bytes, error: Exception, message_class: type[Message] | None) -> None:
        self.data = data
        self.error = error
        self.message_class = message_class

    def invalid_input(self) -> InvalidInput:
        """What was wrong, as the caller's error: the message type and, where one item is to blame, which."""
        cls = self.message_class
        if cls is None:
            return InvalidInput(f"request could not be parsed ({type(self.error).__name__}: {self.error})")
        reason = _blame(self.data, cls) or _reason(self.error, cls.DESCRIPTOR)
        return InvalidInput(f"request is not a valid {cls.DESCRIPTOR.full_name} message: {reason}")


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A request deserializer that returns `_Unparsable` instead of raising (gRPC would answer INTERNAL)."""
    if deserialize is None:
        return None
    message_class = getattr(deserialize, "__self__", None)  # `SomeRequest.FromString` is bound to its class
    if not (isinstance(message_class, type) and issubclass(message_class, Message)):
        message_class = None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, bad UTF-8 in a string field, ...: the caller's fault
            return _Unparsable(data, exc, message_class)

    return parse


def _blame(data: bytes, cls: type[Message]) -> str | None:
    """Names the first entry of the request's repeated `items` field that fails to parse on its own.

    Reads only the top level of the wire format (tags, varints, lengths); None when that level is corrupt itself or
    no single item is to blame.
    """
    items = cls.DESCRIPTOR.fields_by_name.get("items")
    if items is None or items.message_type is None:
        return None
    item_class = message_factory.GetMessageClass(items.message_type)
    index = 0
    for number, chunk in _length_delimited(data):
        if number != items.number:
            continue
        try:
            item_class.FromString(chunk)
        except Exception as exc:
            return f"item {index}: {_reason(exc, items.message_type)}"
        index += 1
    return None


def _reason(exc: Exception, descriptor: Any) -> str:
    """Protobuf's parse error without its boilerplate, with a hint when a string field holds bytes."""
    reason = str(exc).removeprefix(f"Error parsing message with type '{descriptor.full_name}': ")
    names = [f.name for f in descriptor.fields if f.type == FieldDescriptor.TYPE_STRING]
    if "UTF-8" in reason and names:
        reason += f" ({descriptor.name}.{' and .'.join(names)} must be valid UTF-8)"
    return reason


def _length_delimited(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(field number, payload) of each length-delimited field at the top level of a message; stops where the
    wire format is corrupt."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        wire_type = key & 7
        if wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                return
            yield key >> 3, data[pos : pos + size]
            pos += size
        else:  # groups (deprecated) or garbage
            return


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it; past the end of `data`, a position beyond it (callers stop)."""
    value = shift = 0
    while pos < len(data):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return 0, len(data) + 1


def _parsed(request_iterator: Iterable[Any]) -> Iterator[Any]:
    """The messages of a request stream; one that failed to parse raises InvalidInput (answered by `fail`)."""
    for i, request in enumerate(request_iterator):
        if isinstance(request, _Unparsable):
            error = request.invalid_input()
            raise InvalidInput(f"stream message {i}: {error}") from request.error
        yield request


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Maps handler exceptions to status codes and counts requests, errors and latency per method.

    Handlers raise domain exceptions and never call `context.abort` themselves; unknown exceptions are logged with
    their traceback and answered INTERNAL with a generic message (no internals leak to callers). Request messages
    that fail to parse (corrupt protobuf, bytes that are not UTF-8 in a string field) are answered INVALID_ARGUMENT
    here rather than INTERNAL by gRPC: the deserializer hands the handler a stand-in, which `RequestCheckInterceptor`
    (innermost, after auth) refuses; in a stream, at the message that failed.
    """

    def __init__(self, metrics: Any) -> None:
        """Counts into `metrics`.

        Args:
            metrics: `ServiceMetrics` or anything shaped like it (`requests`, `errors`, `request_seconds`, `labels`).
        """
        self._metrics = metrics

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        m = self._metrics
        request_streaming = bool(handler.request_streaming)

        def fail(exc: Exception, context: grpc.ServicerContext) -> None:
            code = status_of(exc)
            if code is not None:
                message = str(exc)
            elif isinstance(exc, grpc.RpcError) and not context.is_active():
                # Reading the request stream of an rpc the client cancelled raises this: the cancel is what happened.
                code, message = grpc.StatusCode.CANCELLED, "cancelled by the client"
            else:
                # A bug, logged and counted as one whether or not the client is still there to be told.
                logger.error("unhandled error in %s", method, exc_info=exc)
                code, message = grpc.StatusCode.INTERNAL, "internal error (logged on the server)"
            m.labels(m.errors, method, code.name).inc()
            context.abort(code, message)  # raises; on an rpc the client cancelled it only ends the handler

        def checked(request: Any) -> Any:
            # A unary request that failed to parse is refused by `RequestCheckInterceptor`, after auth.
            return _parsed(request) if request_streaming else request

        def wrap(fn: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
            if streaming:

                def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    m.labels(m.requests, method).inc()
                    start = time.perf_counter()
                    try:
                        yield from fn(checked(request), context)
                    except Exception as exc:
                        fail(exc, context)
                    finally:
                        m.labels(m.request_seconds, method).observe(time.perf_counter() - start)

                return stream

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                m.labels(m.requests, method).inc()
                start = time.perf_counter()
                try:
                    return fn(checked(request), context)
                except Exception as exc:
                    fail(exc, context)
                finally:
                    m.labels(m.request_seconds, method).observe(time.perf_counter() - start)

            return unary

        return _wrap_handler(handler, wrap, _tolerant)


class AdmissionGate(grpc.ServerInterceptor):
    """Lets rpcs in until `close()`, then refuses new ones with UNAVAILABLE while the admitted ones finish.

    A stopping server closes the gate before gRPC's own stop: an rpc gRPC has accepted but not yet handed to a handler
    would be answered CANCELLED by that stop (a status clients do not retry); past the gate it is answered
    UNAVAILABLE, which they do. Health checks are always let through (probes must see NOT_SERVING, not an error).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = True
        self._active = 0

    @property
    def active(self) -> int:
        """Admitted rpcs that have not finished."""
        with self._cond:
            return self._active

    @property
    def closed(self) -> bool:
        """Whether new rpcs are refused."""
        with self._cond:
            return not self._open

    def close(self) -> None:
        """Refuses every rpc that reaches a handler from now on (in-flight ones go on)."""
        with self._cond:
            self._open = False

    def wait_idle(self, timeout: float) -> bool:
        """Waits up to `timeout` seconds for the admitted rpcs to finish; whether they did."""
        with self._cond:
            return self._cond.wait_for(lambda: self._active == 0, timeout)

    def enter(self) -> None:
        """Admits one call (pair with `leave()`).

        Raises:
            ServerStopping: The gate is closed.
        """
        with self._cond:
            if not self._open:
                raise ServerStopping("server is shutting down; retry (another replica, or this one once restarted)")
            self._active += 1

    def leave(self) -> None:
        """Ends one admitted call."""
        with self._cond:
            self._active -= 1
            if not self._active:
                self._cond.notify_all()

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler

        def admit(fn: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
            if streaming:

                def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    self.enter()
                    try:
                        yield from fn(request, context)
                    finally:
                        self.leave()

                return stream

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                self.enter()
                try:
                    return fn(request, context)
                finally:
                    self.leave()

            return unary

        return _wrap_handler(handler, admit)


class AuthInterceptor(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every rpc except health checks (probes carry no secrets)."""

    def __init__(self, tokens: TokenChecker) -> None:
        self._tokens = tokens

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        authorized = self._tokens.check_metadata(details.invocation_metadata)
        if handler is None or details.method.startswith(HEALTH_PREFIX) or authorized:
            return handler

        def deny(fn: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
            def raise_unauthenticated(request: Any, context: grpc.ServicerContext) -> Any:
                # Raised, not aborted: the error-mapping interceptor (outermost) answers it.
                raise Unauthenticated("missing or invalid bearer token (metadata 'authorization: Bearer <token>')")

            if streaming:

                def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    yield raise_unauthenticated(request, context)

                return stream
            return raise_unauthenticated

        return _wrap_handler(handler, deny)


class RequestCheckInterceptor(grpc.ServerInterceptor):
    """Refuses a unary request that failed to parse (INVALID_ARGUMENT, naming what was wrong); innermost, so the
    gate and auth answer first. Request streams are checked message by message as the handler reads them."""

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or handler.request_streaming:
            return handler

        def check(fn: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
            if streaming:

                def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    if isinstance(request, _Unparsable):
                        raise request.invalid_input() from request.error
                    yield from fn(request, context)

                return stream

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                if isinstance(request, _Unparsable):
                    raise request.invalid_input() from request.error
                return fn(request, context)

            return unary

        return _wrap_handler(handler, check)
