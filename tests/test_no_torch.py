"""Only `trainer/` imports PyTorch, and only the encoder layer imports ONNX Runtime: each part runs on what it needs.

Each case imports the modules in a fresh interpreter and checks which heavy runtimes it loaded.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# part -> (modules, runtimes that must stay out of sys.modules)
PARTS = {
    "imgtxt": (
        ["imgtxt.cli", "imgtxt.bundle", "imgtxt.preprocess", "imgtxt.text", "imgtxt.retrieval_metrics", "imgtxt.wire"],
        ["torch", "onnxruntime"],
    ),
    "client": (
        ["imgtxt.client", "imgtxt.encoders", "imgtxt.encoders.types", "imgtxt.stages"],
        ["torch", "onnxruntime"],
    ),
    "encoders": (["imgtxt.encoders.bundle", "imgtxt.encoders.image", "imgtxt.encoders.text"], ["torch"]),
    "image service": (["image_encoder_service.__main__", "image_encoder_service.server"], ["torch"]),
    "text service": (["text_encoder_service.__main__", "text_encoder_service.server"], ["torch"]),
    "serving": (["imgtxt.serving.main", "imgtxt.serving.server", "imgtxt.supervisor"], ["torch"]),
    "indexer": (
        ["indexer.cli", "indexer.pipeline", "indexer.plan", "indexer.writer", "store.factory"],
        ["torch"],
    ),
    "stores": (["store.edge", "store.client", "store.identity", "store.factory"], ["torch", "onnxruntime"]),
    "store flags": (["store.options"], ["torch"]),
    "search": (["search.cli", "search.searcher", "search.backend"], ["torch"]),
    "search service": (["search_service.__main__", "search_service.server", "search_service.web"], ["torch"]),
    "evaluation": (["evaluation.cli", "evaluation.via_index", "evaluation.offline"], ["torch"]),
    "demo": (["demo.cli"], ["torch"]),
}


@pytest.mark.parametrize("part", sorted(PARTS))
def test_part_imports_only_the_runtimes_it_needs(part: str) -> None:
    modules, absent = PARTS[part]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"loaded = [r for r in {absent!r} if r in sys.modules]\n"
        "assert not loaded, f'imported {loaded}'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_eval_of_a_bundle_runs_without_torch(tiny_bundle: Path, tmp_path: Path) -> None:
    """`imgtxt eval --bundle` encodes through the encoder layer; only `--checkpoint` needs the trainer."""
    from tests.conftest import make_dataset

    data = make_dataset(tmp_path / "data", 4, captions=2)
    code = (
        "import sys\nfrom evaluation.cli import main\n"
        f"assert main(['--bundle', {str(tiny_bundle)!r}, '--data', {str(data)!r}, '--device', 'cpu']) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "rsum" in proc.stdout
