"""Checkpoints: weights, optimizer/scheduler/RNG state, resolved config and metrics, written atomically."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imgtxt.errors import ConfigError
from trainer.config import TrainConfig
from trainer.model import DualEncoder


@dataclass
class LoadedCheckpoint:
    """A checkpoint read back: the rebuilt model plus everything needed to resume."""

    model: DualEncoder
    """The model, weights loaded, in eval mode on CPU."""
    config: dict[str, Any]
    """The resolved training config (plain data, grouped as `TrainConfig.to_dict`, whatever layout it was saved in)."""
    metrics: dict[str, Any]
    """Validation metrics at save time."""
    state: dict[str, Any]
    """Raw checkpoint contents (optimizer, scheduler, loss, epoch, step, rng)."""


def save_checkpoint(path: Path, model: DualEncoder, cfg: TrainConfig, metrics: dict[str, Any], **state: Any) -> None:
    """Writes a checkpoint atomically (temporary file, then rename), so a crash never leaves a truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": model.state_dict(), "config": cfg.to_dict(), "metrics": metrics, **state}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Reads a checkpoint and rebuilds its model from the saved config (no pretrained download: weights are inside).

    Configs saved grouped and the flat configs of older checkpoints both load (`TrainConfig.from_dict`).

    Raises:
        ConfigError: The saved config cannot be read (it names the reason).
    """
    payload = torch.load(path, map_location="cpu", weights_only=False)
    saved = payload.get("config") if isinstance(payload, dict) else None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: not a training checkpoint (no config mapping inside)")
    try:
        cfg = TrainConfig.from_dict(saved)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{path}: the training config saved in this checkpoint cannot be read: {exc}") from exc
    # The checkpoint holds every weight, so skip loading the pretrained backbone files a second time.
    model = DualEncoder(dataclasses.replace(cfg.model, pretrained=False))
    old_local = sorted(k for k in payload["model"] if k.endswith("head.local.weight"))
    if old_local:
        raise ConfigError(
            f"{path}: this checkpoint's hierarchical local embedding is the old linear head on the pooled features "
            f"({old_local[0]}); the local embedding is now built from the local fragments (trainer.model.LocalHead), "
            "so its weights do not carry over: retrain it (or export it with the release that trained it)"
        )
    model.load_state_dict(payload["model"])
    return LoadedCheckpoint(model.eval(), cfg.to_dict(), payload.get("metrics", {}), payload)
