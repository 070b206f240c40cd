"""Data parallelism as one large batch: rank shards of a global batch, and loss inputs gathered with gradients.

Under ``torchrun`` each rank encodes its own shard of the global batch. The in-batch losses (InfoNCE, the VSE++
hinges, HREM's relation module, ...) must nevertheless see the *whole* global batch, or N ranks x B rows would
train like N independent runs with batch B: fewer negatives per anchor, and no pairs across ranks. So the rows are
gathered before the loss, as open_clip's ``gather_features`` with ``gather_with_grad=True`` does
(``src/open_clip/loss.py``).

Why the gradients come out right. Every rank computes the same loss ``L`` on the same gathered batch. The
backward of the gather sums, over ranks, the gradient each rank's loss sends to this rank's rows, so rank r's
rows receive ``N * dL/dz_r``; DistributedDataParallel then *averages* the parameter gradients over the N ranks,
which gives ``(1 / N) * sum_r N * dL/dz_r * dz_r/dtheta = dL/dtheta``, the single-process gradient on the
concatenated batch. Parameters that live in the loss (InfoNCE's ``logit_scale``, the relation module) get the
full ``dL/dphi`` on every rank, and the average of N equal values is that value. No rescaling of the loss is
needed. (open_clip's default, a gather without gradient with the own rows put back, sends only ``dL/dz_r`` to
rank r, so after DDP's average the encoders get ``1 / N`` of the single-process gradient.)
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_batch(batch: np.ndarray, world: int) -> list[np.ndarray]:
    """Every rank's share of a global batch: rank r takes units r, r + world, r + 2 * world, ...

    The split is lossless: the shards together hold every unit of ``batch`` exactly once, whatever
    ``len(batch) % world`` is (the remainder goes to the first ranks, one unit each). Shards may therefore differ
    in length by one, which ``gather_rows`` handles. Every rank knows every shard, so the pairwise labels of the
    gathered batch (``text_sim``, ``local_sim``) can be built locally in the gathered row order.

    Raises:
        ValueError: when the batch has fewer units than ranks (a rank would have nothing to encode).
    """
    if len(batch) < world:
        raise ValueError(f"a global batch of {len(batch)} units cannot give each of {world} ranks at least one")
    return [batch[r::world] for r in range(world)]


class _GatherRows(torch.autograd.Function):
    """All-gather of rows of possibly unequal counts, concatenated in rank order, with gradient to the own rows."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, sizes: tuple[int, ...], rank: int) -> Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        longest = max(sizes)
        # all_gather needs equal shapes: pad to the longest shard, then cut each rank's padding off again.
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        # Each rank's loss depends on every rank's rows: sum what all ranks' losses send to this rank's rows (see
        # the module docstring for why the sum, followed by DDP's average, is the single-process gradient).
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return total[start : start + ctx.sizes[ctx.rank]], None, None


def gather_rows(*tensors: Tensor | None) -> list[Tensor | None]:
    """Concatenates each tensor's rows over all ranks (rank 0's rows first), keeping the autograd graph.

    All tensors share this rank's row count (``None`` passes through, for absent optional fields); ranks may hold
    different row counts. Floating-point tensors that require grad get gradients back to this rank's rows (summed
    over the ranks' losses); others (image ids) are gathered as plain data. The identity under one process.

    Returns:
        The gathered tensors, in argument order.
    """
    rank, world = rank_and_world()
    present = [t for t in tensors if t is not None]
    if world == 1 or not present:
        return list(tensors)
    rows = present[0].shape[0]
    if any(t.shape[0] != rows for t in present):
        raise ValueError(f"gather_rows needs equal row counts, got {[tuple(t.shape) for t in present]}")
    counts = [torch.zeros(1, dtype=torch.long, device=present[0].device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([rows], dtype=torch.long, device=present[0].device))
    sizes = tuple(int(c.item()) for c in counts)
    return [None if t is None else _GatherRows.apply(t, sizes, rank) for t in tensors]
