"""Checkpoints: the grouped config they hold, checkpoints of the older flat layout, and unreadable configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from imgtxt.bundle import load_bundle
from imgtxt.errors import ConfigError
from trainer import export, train
from trainer.checkpoint import load_checkpoint
from trainer.config import load_config
from trainer.model import DualEncoder

# The `config` a checkpoint of the tiny recipe held before the config was grouped: every key flat, `num_workers`
# (never used, since removed) included. Written out rather than generated, so it stays what old files contain.
_OLD_TINY_CONFIG: dict[str, Any] = {
    "data": "",
    "train_split": "train",
    "val_split": "val",
    "train_limit": 20,
    "val_limit": 10,
    "image_backbone": "tiny",
    "text_backbone": "tiny",
    "pretrained": False,
    "dim": 32,
    "pooling": "mean",
    "image_size": 0,
    "train_image_size": 0,
    "flip_average": False,
    "max_tokens": 32,
    "with_unit": True,
    "head_dropout": 0.0,
    "local_dim": 0,
    "image_trainable_stages": 0,
    "text_trainable_layers": 0,
    "cache_features": True,
    "cache_dir": "",
    "cache_views": 1,
    "augment": True,
    "feature_drop": 0.0,
    "sampling": "caption",
    "neighbour_batches_from": 0,
    "neighbour_clusters": 8,
    "epochs": 1,
    "batch_size": 8,
    "lr": 0.001,
    "backbone_lr": 5e-05,
    "weight_decay": 0.0001,
    "warmup_steps": 0,
    "grad_clip": 2.0,
    "ema_decay": 0.0,
    "losses": {"infonce": 1.0, "quantization": 0.1},
    "loss_kwargs": {"quantization": {"mode": "binary"}},
    "unit_loss_weight": 0.1,
    "seed": 0,
    "device": "auto",
    "precision": "auto",
    "num_workers": 0,
    "encode_batch_size": 16,
    "log_every": 1,
}


def _old_checkpoint(path: Path, config: dict[str, Any]) -> DualEncoder:
    """Writes a checkpoint as the trainer did before the groups: weights, the flat config, metrics."""
    torch.manual_seed(3)
    model = DualEncoder(load_config("tiny").model)
    torch.save({"model": model.state_dict(), "config": config, "metrics": {"rsum": 123.0}, "epoch": 1}, path)
    return model


def test_a_checkpoint_of_the_older_flat_layout_loads_and_exports(tmp_path: Path) -> None:
    model = _old_checkpoint(tmp_path / "old.pt", _OLD_TINY_CONFIG)
    ckpt = load_checkpoint(tmp_path / "old.pt")
    for name, tensor in model.state_dict().items():
        assert torch.equal(ckpt.model.state_dict()[name], tensor), name
    expected = load_config("tiny", None, ["losses={infonce: 1.0, quantization: 0.1}"]).to_dict()
    expected["loss"]["kwargs"] = {"quantization": {"mode": "binary"}}
    assert ckpt.config == expected  # read back in the grouped layout
    assert ckpt.metrics == {"rsum": 123.0}
    assert export.main(["--checkpoint", str(tmp_path / "old.pt"), "--out", str(tmp_path / "b"), "--version", "v"]) == 0
    manifest = load_bundle(tmp_path / "b").manifest
    assert manifest.training["model"]["image_backbone"] == "tiny"
    assert manifest.serving.quantization == "binary"  # read from the (now grouped) loss config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image_backbone": "resnet"}, "image_backbone must be one of"),
        ({"frobnicate": 1}, "unknown config key.*frobnicate"),
    ],
)
def test_an_unreadable_config_fails_naming_the_checkpoint_and_the_reason(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    _old_checkpoint(tmp_path / "bad.pt", {**_OLD_TINY_CONFIG, **change})
    with pytest.raises(
        ConfigError, match=f"bad.pt: the training config saved in this checkpoint cannot be read: {message}"
    ):
        load_checkpoint(tmp_path / "bad.pt")


def test_a_run_of_the_older_layout_resumes(synthetic_data: Path, tmp_path: Path) -> None:
    """`--resume` from a last.pt and config.yaml written before the groups continues the run."""
    run = tmp_path / "run"
    sets = [f"cache_dir={tmp_path / 'cache'}", "train_limit=0", "val_limit=0"]
    argv = ["--recipe", "tiny", "--data", str(synthetic_data), "--out", str(run), *(f"--set={s}" for s in sets)]
    assert train.main(argv) == 0
    last = run / "checkpoints" / "last.pt"
    payload = torch.load(last, weights_only=False)
    grouped = payload["config"]
    assert set(grouped) == {"data", "model", "optim", "loss", "cache", "run"}
    old = {**_OLD_TINY_CONFIG, "losses": {"infonce": 1.0}, "loss_kwargs": {}, "train_limit": 0, "val_limit": 0}
    old.update(data=str(synthetic_data), cache_dir=str(tmp_path / "cache"))
    torch.save({**payload, "config": old}, last)
    assert load_checkpoint(last).config == grouped
    assert train.main([*argv, "--set", "epochs=2", "--resume"]) == 0
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2] and torch.load(last, weights_only=False)["epoch"] == 2


def test_a_hierarchical_checkpoint_of_the_pooled_linear_local_head_fails_saying_why(tmp_path: Path) -> None:
    model = DualEncoder(load_config("tiny", None, ["with_unit=false", "local_dim=8"]).model)
    weights = {}
    for name, tensor in model.state_dict().items():  # the old layout: head.local was one Linear on pooled features
        weights[name.replace("head.local.fragment.", "head.local.")] = tensor
    config = {**_OLD_TINY_CONFIG, "local_dim": 8, "with_unit": False}
    torch.save({"model": weights, "config": config, "metrics": {}, "epoch": 1}, tmp_path / "hier.pt")
    with pytest.raises(ConfigError, match=r"hier.pt: .*old linear head on the pooled features.*retrain"):
        load_checkpoint(tmp_path / "hier.pt")
