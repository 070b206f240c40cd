"""Bearer-token auth: the one check of gRPC metadata (`AuthInterceptor`) and HTTP headers (the search service)."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Any


class TokenChecker:
    """Checks `Bearer <token>` credentials in constant time; the one check of gRPC metadata and HTTP headers."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def check(self, given: str | bytes | None) -> bool:
        """Whether an `authorization` value carries the token."""
        if given is None:
            return False
        data = given.encode() if isinstance(given, str) else given
        # Constant-time comparison: the answer's timing must not reveal how much of the token matched.
        return hmac.compare_digest(data, self._expected)

    def check_metadata(self, metadata: Sequence[tuple[str, Any]] | None) -> bool:
        """Whether gRPC invocation metadata carries the token."""
        for key, value in metadata or ():
            if key == "authorization":
                return self.check(value)
        return False


def token_checker(token: str | None) -> TokenChecker | None:
    """A checker of `token`; None when no token is configured (no auth)."""
    return TokenChecker(token) if token else None
