"""`torchrun` data parallelism: two CPU processes (gloo) train tiny towers and end with identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.checkpoint import load_checkpoint


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "steps_per_epoch"),
    [
        ([], 4),  # 16 train images x 2 captions, global batch 2 x 4 captions = 8 -> 4 steps per epoch
        (["--set", "sampling=image", "--set", "batch_size=2", "--set", "cache_views=2"], 4),  # 16 images / (2 x 2)
    ],
    ids=["caption-major", "image-major-with-views"],
)
def test_two_gloo_ranks_agree(synthetic_data: Path, tmp_path: Path, extra: list[str], steps_per_epoch: int) -> None:
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "imgtxt.cli",
        "train", "--recipe", "tiny", "--data", str(synthetic_data), "--out", str(run), "-v",
        "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "train_limit=0", "--set", "val_limit=0",
        "--set", "epochs=2", "--set", "batch_size=4", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[2], env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Each rank checks after every epoch that its weights equal the others' (all_gather of checksums).
    assert proc.stderr.count("ranks agree") == 2 * 2, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]  # only rank 0 writes
    assert records[-1]["step"] == 2 * steps_per_epoch
    assert load_checkpoint(run / "checkpoints" / "last.pt").state["epoch"] == 2
