"""The indexer never imports torch (it runs where only the serving install is present)."""

from __future__ import annotations

import subprocess
import sys

MODULES = [
    "indexer",
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
]


def test_indexer_imports_no_torch() -> None:
    code = (
        "import importlib, sys\n"
        f"for m in {MODULES!r}: importlib.import_module(m)\n"
        "from indexer.encoding import InProcessEncoder, GrpcEncoder\n"
        "import image_encoder_service.encoder, text_encoder_service.encoder, imgtxt.client\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
