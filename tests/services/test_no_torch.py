"""The serving side never imports PyTorch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_services_and_client_do_not_import_torch() -> None:
    modules = [
        "image_encoder_service.server",
        "image_encoder_service.__main__",
        "text_encoder_service.server",
        "text_encoder_service.__main__",
        "imgtxt.client",
        "imgtxt.serving",
        "imgtxt.serving.main",
    ]
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nassert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
