"""AdamW parameter groups (no weight decay on scalars), the LR schedule, weight averaging, resuming older states."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

NO_DECAY_SUFFIX = "_no_decay"

_PER_GROUP_SCHEDULER_KEYS = ("base_lrs", "_last_lr", "lr_lambdas")


def decays(param: nn.Parameter) -> bool:
    """Whether weight decay applies: to every tensor parameter, not to scalars (``ndim == 0``).

    Weight decay pulls a parameter towards 0, a prior for weights that multiply inputs. For InfoNCE's ``logit_scale``
    (the log inverse temperature) it is a bias of its own: it pulls towards a temperature of 1, against the very
    gradient that sets it, so scalars are exempt (open_clip excludes ``logit_scale`` for the same reason). Biases and
    norm gains keep their decay: exempting them too (open_clip's and nanoGPT's ``ndim < 2`` rule) would change the
    measured recipes, which were tuned with it, and is left to a measured trial.
    """
    return param.ndim > 0


def build_param_groups(
    parts: Mapping[str, tuple[Sequence[nn.Parameter], float]], weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups: each part (name -> (parameters, learning rate)) splits into a decayed and a no-decay group.

    Groups carry ``name`` (``PART`` or ``PART_no_decay``) and ``part``, which travel with the optimizer state, so a
    checkpoint says which group is which (``upgrade_optimizer_state`` relies on it). Empty groups are left out.

    Args:
        parts: Part name -> (its trainable parameters, its peak learning rate), e.g. heads and backbone.
        weight_decay: AdamW weight decay of the decayed groups.
    """
    groups: list[dict[str, Any]] = []
    for part, (params, lr) in parts.items():
        for suffix, wd, members in (
            ("", weight_decay, [p for p in params if decays(p)]),
            (NO_DECAY_SUFFIX, 0.0, [p for p in params if not decays(p)]),
        ):
            if members:
                groups.append({"params": members, "lr": lr, "weight_decay": wd, "name": part + suffix, "part": part})
    return groups


def upgrade_optimizer_state(
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    parts: Mapping[str, Sequence[nn.Parameter]],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Maps a checkpoint's optimizer and LR-scheduler state onto ``optimizer``'s groups when they were saved in the
    older layout; returns states in the current layout unchanged.

    The older layout had one group per part, in the order of ``parts`` (heads, then backbone when fine-tuned),
    with every parameter decayed and no ``name`` key; its state is indexed by the position of each parameter in
    that order. Here each parameter's moments move to its position in the current groups, each current group
    takes the saved hyperparameters (``lr``, ``initial_lr``, betas, ...) of the part it comes from, except its
    own ``weight_decay``, and the scheduler's per-group lists (``base_lrs``, ``_last_lr``) are expanded the same
    way.

    Args:
        optimizer_state: ``optimizer.state_dict()`` as saved.
        scheduler_state: The LR scheduler's ``state_dict()`` as saved.
        optimizer: The optimizer to load into (groups from ``build_param_groups``).
        parts: Part name -> parameters, in the order the older layout made its groups.

    Raises:
        ValueError: when the saved groups do not match the parts (another model or another freeze).
    """
    saved_groups = optimizer_state["param_groups"]
    if all("name" in g for g in saved_groups):
        return optimizer_state, scheduler_state
    legacy = list(parts)[: len(saved_groups)]
    if len(legacy) != len(saved_groups) or any(
        len(g["params"]) != len(parts[name]) for name, g in zip(legacy, saved_groups, strict=True)
    ):
        raise ValueError(
            f"checkpoint optimizer groups of sizes {[len(g['params']) for g in saved_groups]} do not match the "
            f"trained parts { ({name: len(p) for name, p in parts.items()}) }"
        )
    position = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    state: dict[int, Any] = {}
    for name, group in zip(legacy, saved_groups, strict=True):
        for index, param in zip(group["params"], parts[name], strict=True):
            if index in optimizer_state["state"]:
                state[position[id(param)]] = optimizer_state["state"][index]
    legacy_index = {name: k for k, name in enumerate(legacy)}
    current = optimizer.state_dict()["param_groups"]  # current hyperparameters, params as indices
    if any(g["part"] not in legacy_index for g in current):
        raise ValueError(f"checkpoint optimizer has groups for {legacy}, the optimizer for {sorted(parts)}")
    source = [legacy_index[g["part"]] for g in current]
    groups = [
        {
            **{k: v for k, v in saved_groups[k_old].items() if k not in ("params", "weight_decay")},
            **{k: g[k] for k in ("params", "weight_decay", "name", "part")},
        }
        for g, k_old in zip(current, source, strict=True)
    ]
    scheduler = copy.copy(scheduler_state)
    for key in _PER_GROUP_SCHEDULER_KEYS:
        values = scheduler_state.get(key)
        if isinstance(values, list) and len(values) == len(saved_groups):
            scheduler[key] = [values[k] for k in source]
    logger.info("optimizer state upgraded", extra={"from_groups": len(saved_groups), "to_groups": len(groups)})
    return {"state": state, "param_groups": groups}, scheduler


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The LR schedule's factor at `step`: linear warm-up, then cosine decay to 0 at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class WeightAverage:
    """Exponential moving average of trained parameters (Polyak averaging, as timm's ModelEmaV2).

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (TensorFlow's
    ExponentialMovingAverage with num_updates), so the early average is not dominated by the initial weights.
    """

    def __init__(self, params: list[nn.Parameter], decay: float) -> None:
        self.params, self.decay, self.updates = params, decay, 0
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        """Moves the average towards the current weights; call after each optimizer step."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for shadow, p in zip(self.shadow, self.params, strict=True):
            shadow.lerp_(p.detach(), 1.0 - decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily puts the averaged weights into the parameters (restores the raw ones on exit)."""
        raw = [p.detach().clone() for p in self.params]
        _copy_into(self.params, self.shadow)
        try:
            yield
        finally:
            _copy_into(self.params, raw)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _copy_into(self.shadow, state["shadow"])
        self.updates = int(state["updates"])


@torch.no_grad()
def _copy_into(targets: list[Tensor] | list[nn.Parameter], sources: list[Tensor]) -> None:
    for target, source in zip(targets, sources, strict=True):
        target.copy_(source)
