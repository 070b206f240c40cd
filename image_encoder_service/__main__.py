"""`imgtxt serve-image` / `python -m image_encoder_service`: serves a bundle's image tower until SIGTERM."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from image_encoder_service.server import create_server
from imgtxt.encoders.image import ImageEncoder
from imgtxt.preprocess import ImageLimits
from imgtxt.serving.main import run_service


def _encoder_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "limits": ImageLimits(max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels),
        "preprocess_threads": args.preprocess_threads,
    }


def main(argv: list[str] | None = None) -> int:
    """Runs the image encoder service; returns the exit code."""
    return run_service(argv, encoder_class=ImageEncoder, create_server=create_server, encoder_options=_encoder_options)


if __name__ == "__main__":
    sys.exit(main())
