"""A job killed with SIGKILL mid-run and restarted ends with exactly the points of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from indexer.cli import main as index_main
from store.factory import open_store
from tests.conftest import make_dataset

REPO = Path(__file__).resolve().parents[2]


def _argv(data: Path, bundle: Path, store: Path, checkpoint_every: int = 1) -> list[str]:
    return [
        str(data),
        "--bundle",
        str(bundle),
        "--in-process",
        "--device",
        "cpu",
        "--store",
        str(store),
        "--batch-size",
        "4",
        "--checkpoint-every",
        str(checkpoint_every),
        "--no-progress",
        "--json",
        "-",
    ]


def _wait_for_progress(proc: subprocess.Popen[str], checkpoint: Path, deadline_s: float = 120.0) -> dict:
    """Polls the checkpoint file until it shows committed records of an unfinished job (or the job exits)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            cp = json.loads(checkpoint.read_text())
            if cp["committed_records"] > 0 and not cp["done"]:
                return cp
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        try:
            proc.wait(timeout=0.005)  # returns at once if the job has already ended
            raise AssertionError(f"the job ended before it could be killed: {proc.returncode}")
        except subprocess.TimeoutExpired:
            pass
    raise AssertionError("no checkpoint progress before the deadline")


def test_sigkill_mid_run_then_resume_gives_identical_points(tmp_path: Path, tiny_bundle: Path) -> None:
    data = make_dataset(tmp_path / "data", 120, captions=1, missing=2)
    killed_store, clean_store = tmp_path / "killed", tmp_path / "clean"
    checkpoint = killed_store / "_checkpoints" / "tiny-d32-s0" / "shard-0-of-1.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgtxt.cli", "index", *_argv(data, tiny_bundle, killed_store)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    cp = _wait_for_progress(proc, checkpoint)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert 0 < cp["committed_records"] < 122

    # Restart: resumes after the committed records; the few written after the last checkpoint are overwritten.
    assert index_main(_argv(data, tiny_bundle, killed_store)) == 0
    assert index_main(_argv(data, tiny_bundle, clean_store, checkpoint_every=100)) == 0
    final = json.loads(checkpoint.read_text())
    assert final["done"] and final["counts"] == {"image": 120, "text": 120, "unit": 120, "skipped": 6, "failed": 0}
    rejects = (checkpoint.parent / "rejects-0-of-1.jsonl").read_text().splitlines()
    assert len(rejects) == 6 == len(set(rejects))  # listed once each, despite the kill

    a, b = open_store(killed_store), open_store(clean_store)
    pa, pb = a.dump("tiny-d32-s0"), b.dump("tiny-d32-s0")
    assert len(pa) == a.count("tiny-d32-s0") == 360  # none missing, none duplicated
    assert pa.keys() == pb.keys()
    for pid, (payload, vectors) in pa.items():
        assert payload == pb[pid][0]
        for name, vec in vectors.items():
            np.testing.assert_allclose(vec, pb[pid][1][name], atol=1e-5)
    a.close()
    b.close()
