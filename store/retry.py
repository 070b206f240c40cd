"""Retries with exponential backoff on retryable errors only; anything else surfaces at once (catch-alls hide bugs)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

logger = logging.getLogger(__name__)

T = TypeVar("T")
RETRYABLE_GRPC = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
)
# The REST equivalents: too many requests, bad gateway, unavailable, gateway timeout.
RETRYABLE_HTTP = frozenset({429, 502, 503, 504})


def is_retryable(exc: BaseException) -> bool:
    """Whether an error is transient: gRPC UNAVAILABLE / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED, their HTTP twins,
    or a connection-level failure of the REST transport."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return exc.code() in RETRYABLE_GRPC
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status in RETRYABLE_HTTP
    # qdrant-client wraps transport failures (connection refused, timeouts) in ResponseHandlingException.
    return type(exc).__name__ == "ResponseHandlingException"


def call_with_retry(
    fn: Callable[[], T],
    attempts: int = 5,
    base_delay: float = 0.2,
    max_delay: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Calls `fn`, retrying retryable errors with exponential backoff and full jitter.

    Args:
        fn: The call.
        attempts: Total attempts (>= 1).
        base_delay: First backoff ceiling in seconds (doubles each retry).
        max_delay: Largest backoff ceiling.
        sleep: The wait function (injectable for tests).

    Raises:
        The last error when attempts run out, or any non-retryable error immediately.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts or not is_retryable(exc):
                raise
            delay = random.uniform(0, min(max_delay, base_delay * 2 ** (attempt - 1)))
            logger.warning(
                "retryable error, backing off",
                extra={"attempt": attempt, "delay_s": round(delay, 3), "error": str(exc)},
            )
            sleep(delay)
    raise AssertionError("unreachable")
