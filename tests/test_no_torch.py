"""Only `trainer/` imports PyTorch: the shared package, both services and the indexer run on the serving install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

MODULES = {
    "imgtxt": ["imgtxt.cli", "imgtxt.bundle", "imgtxt.preprocess", "imgtxt.text", "imgtxt.metrics", "imgtxt.datasets"],
    "image service": [
        "image_encoder_service.__main__",
        "image_encoder_service.server",
        "image_encoder_service.encoder",
    ],
    "text service": ["text_encoder_service.__main__", "text_encoder_service.server", "text_encoder_service.encoder"],
    "client": ["imgtxt.client", "imgtxt.serving", "imgtxt.serving.main"],
    "indexer": [
        "indexer.cli",
        "indexer.pipeline",
        "indexer.reader",
        "indexer.writer",
        "indexer.encoding",
        "indexer.edge_store",
        "indexer.client_store",
        "indexer.search",
        "indexer.evaluate",
        "indexer.demo",
    ],
}


@pytest.mark.parametrize("part", sorted(MODULES))
def test_part_imports_no_torch(part: str) -> None:
    code = (
        "import importlib, sys\n"
        f"for m in {MODULES[part]!r}: importlib.import_module(m)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
