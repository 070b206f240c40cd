"""Server interceptors: the ONE place domain exceptions become gRPC status codes, plus bearer-token auth."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from imgtxt.errors import InvalidInput, LimitExceeded, Overloaded, Unauthenticated
from imgtxt.serving.prometheus import ServiceMetrics

logger = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"

# Most specific first: LimitExceeded and InvalidInput are both ValueErrors, but no plain ValueError is mapped (a
# ValueError from our own code is a bug, answered INTERNAL).
_STATUS_OF: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
)


def status_of(exc: Exception) -> grpc.StatusCode | None:
    """The status code of a domain exception; None for anything else (a bug: INTERNAL)."""
    for cls, code in _STATUS_OF:
        if isinstance(exc, cls):
            return code
    return None


def _wrap_handler(
    handler: grpc.RpcMethodHandler, wrap: Callable[[Callable[..., Any], bool], Callable[..., Any]]
) -> grpc.RpcMethodHandler:
    """Rebuilds a method handler with its behaviour wrapped (`wrap(fn, streaming_response)`)."""
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
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Maps handler exceptions to status codes and counts requests, errors and latency per method.

    Handlers raise domain exceptions and never call `context.abort` themselves; unknown exceptions are logged with
    their traceback and answered INTERNAL with a generic message (no internals leak to callers).
    """

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        m = self._metrics

        def fail(exc: Exception, context: grpc.ServicerContext) -> None:
            code = status_of(exc)
            if code is None:
                if not context.is_active():  # the client went away mid-rpc: nothing to answer
                    code = grpc.StatusCode.CANCELLED
                    m.labels(m.errors, method, code.name).inc()
                    return
                logger.error("unhandled error in %s", method, exc_info=exc)
                code, message = grpc.StatusCode.INTERNAL, "internal error (logged on the server)"
            else:
                message = str(exc)
            m.labels(m.errors, method, code.name).inc()
            context.abort(code, message)

        def wrap(fn: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
            if streaming:

                def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    m.labels(m.requests, method).inc()
                    start = time.perf_counter()
                    try:
                        yield from fn(request, context)
                    except Exception as exc:
                        fail(exc, context)
                    finally:
                        m.labels(m.request_seconds, method).observe(time.perf_counter() - start)

                return stream

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                m.labels(m.requests, method).inc()
                start = time.perf_counter()
                try:
                    return fn(request, context)
                except Exception as exc:
                    fail(exc, context)
                finally:
                    m.labels(m.request_seconds, method).observe(time.perf_counter() - start)

            return unary

        return _wrap_handler(handler, wrap)


class AuthInterceptor(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every rpc except health checks (probes carry no secrets)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def _authorized(self, details: Any) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                # Constant-time comparison: the answer's timing must not reveal how much of the token matched.
                return hmac.compare_digest(given, self._expected)
        return False

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX) or self._authorized(details):
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
