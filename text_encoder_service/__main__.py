"""`imgtxt serve-text` / `python -m text_encoder_service`: serves a bundle's text tower until SIGTERM."""

from __future__ import annotations

import sys

from imgtxt.encoders.text import TextEncoder
from imgtxt.serving.main import run_service
from text_encoder_service.server import create_server


def main(argv: list[str] | None = None) -> int:
    """Runs the text encoder service; returns the exit code."""
    return run_service(argv, encoder_class=TextEncoder, create_server=create_server)


if __name__ == "__main__":
    sys.exit(main())
