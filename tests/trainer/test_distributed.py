"""Data parallelism: two gloo ranks train exactly like one process on the concatenated batch; `torchrun` end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.checkpoint import load_checkpoint
from trainer.config import load_config
from trainer.data import TowerInputs
from trainer.distributed import gather_rows, shard_batch
from trainer.losses import CombinedLoss
from trainer.model import DualEncoder
from trainer.train import TrainStep

# The global batch: 11 captions of 8 images, rank 0 holding rows 0-5 and rank 1 rows 6-10 (unequal shards). Images
# 0 (twice on rank 0), 1 and 2 (on both ranks) have several captions, so positives also cross ranks.
_IMAGE_IDS = [0, 1, 2, 0, 3, 4, 5, 1, 6, 7, 2]
_SHARDS = (slice(0, 6), slice(6, 11))
_TOKENS = 6

# (model overrides, loss weights, loss kwargs): InfoNCE, the VSE++ hinge, every in-batch loss at once (labels,
# relation module and unit head included), and the hierarchical local loss. A unit head only where a loss trains it:
# DDP requires every trained parameter to get a gradient (the trainer adds unit_hinge whenever there is one).
_EVERY_IN_BATCH_LOSS = (
    "infonce",
    "vsepp_triplet",
    "adaptive_margin_triplet",
    "bcls",
    "center",
    "relation",
    "unit_hinge",
    "quantization",
)
_CASES: dict[str, tuple[list[str], dict[str, float], dict[str, dict[str, Any]]]] = {
    "infonce": (["with_unit=false"], {"infonce": 1.0}, {}),
    "vsepp_triplet": (["with_unit=false"], {"vsepp_triplet": 1.0}, {}),
    # BCLS on the frozen text tower's labels, the ones `_batch` draws (its default lexical labels are per caption
    # table, covered by the gloo runs below).
    "all": (
        [],
        dict.fromkeys(_EVERY_IN_BATCH_LOSS, 1.0),
        {
            "relation": {"dim": 32},
            "bcls": {"triplet_kwargs": {"labels": "caption"}, "kendall_kwargs": {"labels": "caption"}},
        },
    ),
    "hierarchical": (["local_dim=8", "with_unit=false"], {"infonce": 1.0, "local_similarity": 1.0}, {}),
    # HREM's fragment connections and learned relevance: the caption fragments of shards of different lengths.
    "relation_fragment": (
        ["with_unit=false"],
        {"vsepp_triplet": 1.0, "relation": 1.0},
        {"relation": {"dim": 32, "connections": "fragment", "relevance": "learned", "relevance_weight": 1.0}},
    ),
}


def _step(case: str) -> TrainStep:
    """The case's trainable step in float64 (so equal maths gives equal numbers), with the trainer's freeze: the
    top image stage, the text layer, pools, heads, unit head and loss parameters train."""
    overrides, weights, kwargs = _CASES[case]
    torch.manual_seed(0)
    model = DualEncoder(load_config("tiny", None, overrides).model)
    step = TrainStep(model, CombinedLoss(weights, kwargs), model.image.num_stages - 1, 1).double()
    model.requires_grad_(False)
    trained = (model.image.stages[-1], model.text.layers, model.image.pool, model.image.head, model.text.pool)
    for module in (*trained, model.text.head, model.unit):
        if module is not None:
            module.requires_grad_(True)
    model.eval()  # frozen BatchNorm statistics, as in training; no dropout in the tiny recipe anyway
    return step


def _batch() -> dict[str, torch.Tensor]:
    """The global batch's tower inputs at the split points and its pairwise labels (seeded)."""
    g = torch.Generator().manual_seed(1)
    n = len(_IMAGE_IDS)
    lengths = torch.randint(2, _TOKENS + 1, (n,), generator=g)
    text_sim = torch.rand(n, n, generator=g, dtype=torch.float64)
    local_sim = torch.rand(n, n, generator=g, dtype=torch.float64)
    return {
        "pixels": torch.randn(max(_IMAGE_IDS) + 1, 3, 16, 16, generator=g, dtype=torch.float64),
        "hidden": torch.randn(n, _TOKENS, 32, generator=g, dtype=torch.float64),
        "mask": (torch.arange(_TOKENS) < lengths.unsqueeze(1)).long(),
        "text_sim": ((text_sim + text_sim.T) / 2).fill_diagonal_(1.0),
        "local_sim": ((local_sim + local_sim.T) / 2).fill_diagonal_(1.0),
    }


def _run(step: torch.nn.Module, model: DualEncoder, rows: slice, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Loss terms and trained-parameter gradients of one step on caption rows `rows` (labels: the whole batch)."""
    ids = np.asarray(_IMAGE_IDS)[rows]
    distinct, pair = np.unique(ids, return_inverse=True)
    with torch.no_grad():
        images = model.image.features(batch["pixels"][distinct], model.image.num_stages - 1)
    inputs = TowerInputs(images, batch["hidden"][rows], batch["mask"][rows])
    labels = {"text_sim": batch["text_sim"], "local_sim": batch["local_sim"]}
    out = step(inputs, torch.from_numpy(pair), torch.from_numpy(ids), 1, labels)
    out["loss"].backward()
    inner = step.module if isinstance(step, torch.nn.parallel.DistributedDataParallel) else step
    grads = {n: p.grad.clone() for n, p in inner.named_parameters() if p.requires_grad and p.grad is not None}
    return {"terms": {k: float(v.detach()) for k, v in out.items()}, "grads": grads}


def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        batch, results = _batch(), {}
        for case in _CASES:
            step = _step(case)
            ddp = torch.nn.parallel.DistributedDataParallel(step)
            results[case] = _run(ddp, step.model, _SHARDS[rank], batch)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Each case's loss terms and gradients on both ranks of a 2-process gloo group (DDP-wrapped steps)."""
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_rank_worker, args=(2, _free_port(), str(out)), nprocs=2, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("case", list(_CASES))
def test_two_ranks_train_like_one_process_on_the_concatenated_batch(
    two_rank_results: list[dict[str, Any]], case: str
) -> None:
    """Loss values and DDP-averaged gradients of 2 ranks x (6, 5) rows equal those of one process on all 11 rows.

    Without the gather each rank's losses would see only its own rows: other values, 1/2-sized encoder gradients.
    """
    step = _step(case)
    single = _run(step, step.model, slice(0, len(_IMAGE_IDS)), _batch())
    assert len(single["grads"]) > 8  # heads, pools, top stages, loss parameters
    for rank, results in enumerate(two_rank_results):
        got = results[case]
        assert got["terms"].keys() == single["terms"].keys()
        loss_diff = max(abs(got["terms"][k] - v) for k, v in single["terms"].items())
        assert loss_diff < 1e-10, (rank, got["terms"], single["terms"])
        assert got["grads"].keys() == single["grads"].keys()
        grad_diff = max(float((got["grads"][n] - g).abs().max()) for n, g in single["grads"].items())
        scale = max(float(g.abs().max()) for g in single["grads"].values())
        assert grad_diff < 1e-10 * max(1.0, scale), (rank, grad_diff)


def test_shards_split_a_global_batch_without_losing_the_remainder() -> None:
    batch = np.arange(100, 111)  # 11 units over 3 ranks: 4 + 4 + 3
    shards = shard_batch(batch, 3)
    assert [len(s) for s in shards] == [4, 4, 3]
    assert sorted(np.concatenate(shards).tolist()) == batch.tolist()
    with pytest.raises(ValueError, match="at least one"):
        shard_batch(np.arange(2), 3)


def test_gather_rows_is_the_identity_in_one_process() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_rows(x, None) == [x, None]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sets", "steps_per_epoch"),
    [
        ([], 4),  # 16 train images x 2 captions, global batch 2 x 4 captions = 8 -> 4 steps per epoch
        (["sampling=image", "batch_size=2", "cache_views=2"], 4),  # 16 images / (2 x 2)
        # Neighbour batches of <= 3 images packed into the 4 steps, and pairwise labels for the gathered batch.
        (
            [
                "sampling=image",
                "batch_size=2",
                "neighbour_batches_from=2",
                "neighbour_clusters=3",
                "losses={infonce: 1.0, bcls: 1.0}",
            ],
            4,
        ),
    ],
    ids=["caption-major", "image-major-with-views", "neighbour-batches-with-labels"],
)
def test_two_gloo_ranks_agree(synthetic_data: Path, tmp_path: Path, sets: list[str], steps_per_epoch: int) -> None:
    run = tmp_path / "run"
    sets = [f"cache_dir={tmp_path / 'cache'}", "train_limit=0", "val_limit=0", "epochs=2", "batch_size=4", *sets]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    train = ["-m", "imgtxt.cli", "train", "--recipe", "tiny", "--data", str(synthetic_data), "--out", str(run), "-v"]
    cmd = [*torchrun, *train, *(f"--set={s}" for s in sets)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[2], env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Each rank checks after every epoch that its weights equal the others' (all_gather of checksums).
    assert proc.stderr.count("ranks agree") == 2 * 2, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]  # only rank 0 writes
    assert records[-1]["step"] == 2 * steps_per_epoch
    assert load_checkpoint(run / "checkpoints" / "last.pt").state["epoch"] == 2
