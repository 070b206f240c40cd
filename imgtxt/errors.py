"""Domain exceptions shared by every part (the gRPC layer maps them to status codes in one place), and the one
mapping of the errors that end an `imgtxt` command to its exit code."""

from __future__ import annotations

import sys


class ImgTxtError(Exception):
    """Base class of the project's errors."""


class InvalidInput(ImgTxtError, ValueError):
    """The caller sent something malformed (maps to INVALID_ARGUMENT)."""


class WrongSpace(InvalidInput):
    """A well-formed request against a collection of another embedding space: its vectors were written by another
    bundle than the one encoding the query (maps to FAILED_PRECONDITION, HTTP 409; a usage error for a command)."""


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


EXIT_OK = 0
"""Exit code of a command that did what it was asked."""
EXIT_FAILURE = 1
"""Exit code of a command that started and failed at run time: a service, the store, the file system or the data
failed it (or, with `--strict`, items were rejected)."""
EXIT_USAGE = 2
"""Exit code of a command given something it cannot run with: a bad flag or value (argparse's own code), a missing or
invalid bundle, checkpoint, config or data path, options that contradict each other or an existing collection."""

USAGE_ERRORS: tuple[type[BaseException], ...] = (ValueError, BundleError, FileNotFoundError, NotADirectoryError)
"""What `exit_code` maps to EXIT_USAGE: ValueError covers ConfigError, InvalidInput, LimitExceeded and the
commands' own usage errors."""


def exit_code(exc: BaseException) -> int:
    """The one mapping of an error that ends an `imgtxt` command to its exit code: EXIT_USAGE for `USAGE_ERRORS`,
    EXIT_FAILURE for anything else (OSError, gRPC errors, timeouts, unreachable services...)."""
    return EXIT_USAGE if isinstance(exc, USAGE_ERRORS) else EXIT_FAILURE


def fail(prog: str, exc: BaseException) -> int:
    """Prints `PROG: error: MESSAGE` on stderr (argparse's form) and returns `exit_code(exc)`: a command's
    `return fail("imgtxt x", exc)`."""
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return exit_code(exc)
