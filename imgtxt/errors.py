"""Domain exceptions shared by every part; the gRPC layer maps them to status codes in one place."""

from __future__ import annotations


class ImgTxtError(Exception):
    """Base class of the project's errors."""


class InvalidInput(ImgTxtError, ValueError):
    """The caller sent something malformed (maps to INVALID_ARGUMENT)."""


class LimitExceeded(ImgTxtError, ValueError):
    """An input is over a configured limit (maps to RESOURCE_EXHAUSTED)."""


class Overloaded(ImgTxtError):
    """The server's queue is full; retry later (maps to RESOURCE_EXHAUSTED)."""


class Unauthenticated(ImgTxtError):
    """Missing or wrong credentials (maps to UNAUTHENTICATED)."""


class BundleError(ImgTxtError):
    """A model bundle is missing, malformed, or does not match its recorded hashes."""


class ConfigError(ImgTxtError, ValueError):
    """A configuration value is invalid."""
