"""Logging set-up for entry points: quiet by default, structured (one JSON object a line) on request."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# Attributes every LogRecord has; anything else passed through `extra=` is a structured field.
_RECORD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, logger, message, plus the `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class KeyValueFormatter(logging.Formatter):
    """Human-readable lines with the `extra=` fields appended as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _RECORD_ATTRS)
        return f"{line} {extra}" if extra else line


def setup_logging(verbosity: int = 0, json_logs: bool = False) -> None:
    """Configures the root logger once, from an entry point (never from library code).

    Args:
        verbosity: 0 = warnings only, 1 = info, 2+ = debug.
        json_logs: Emit one JSON object per line (for log shippers) instead of key=value text.
    """
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json_logs else KeyValueFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def add_logging_flags(parser: Any) -> None:
    """Adds `-v/--verbose` and `--log-json` to an argparse parser."""
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logs (-v info, -vv debug)")
    parser.add_argument("--log-json", action="store_true", help="structured logs: one JSON object per line")
