"""Optimizer groups: no weight decay on the logit scale (scalars); older checkpoints still resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from trainer.config import load_config
from trainer.losses import InfoNCELoss
from trainer.optim import build_param_groups, lr_factor, upgrade_optimizer_state
from trainer.train import Trainer


def test_tensors_decay_while_scalars_do_not() -> None:
    head, loss, norm = nn.Linear(4, 3), InfoNCELoss(), nn.LayerNorm(3)
    groups = build_param_groups(
        {"heads": ([*head.parameters(), *loss.parameters()], 1e-3), "backbone": (list(norm.parameters()), 1e-4)},
        weight_decay=0.05,
    )
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == ["heads", "heads_no_decay", "backbone"]  # no empty "backbone_no_decay" group
    assert by_name["heads"]["params"] == [head.weight, head.bias] and by_name["heads"]["weight_decay"] == 0.05
    assert by_name["heads_no_decay"]["params"] == [loss.logit_scale]
    assert by_name["heads_no_decay"]["weight_decay"] == 0.0
    assert by_name["backbone"]["params"] == list(norm.parameters()) and by_name["backbone"]["weight_decay"] == 0.05
    assert by_name["heads_no_decay"]["lr"] == 1e-3 and by_name["backbone"]["lr"] == 1e-4


def _overrides(data: Path, cache: Path) -> list[str]:
    run = [f"data={data}", f"cache_dir={cache}", "train_limit=0", "val_limit=0"]
    return [*run, "weight_decay=0.05", "image_trainable_stages=1"]


def _group_of(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> dict:
    (group,) = [g for g in optimizer.param_groups if any(p is param for p in g["params"])]
    return group


def test_trainer_does_not_decay_the_logit_scale(synthetic_data: Path, tmp_path: Path) -> None:
    trainer = Trainer(load_config("tiny", None, _overrides(synthetic_data, tmp_path / "c")), tmp_path / "r").setup()
    infonce = trainer.loss.losses["infonce"]
    assert isinstance(infonce, InfoNCELoss)
    assert _group_of(trainer.optimizer, infonce.logit_scale)["weight_decay"] == 0.0
    assert _group_of(trainer.optimizer, trainer.model.image.head.linear.weight)["weight_decay"] == 0.05
    top_stage_conv = trainer.model.image.stages[-1][0]
    assert _group_of(trainer.optimizer, top_stage_conv.weight)["lr"] == trainer.cfg.optim.backbone_lr
    assert _group_of(trainer.optimizer, top_stage_conv.bias)["weight_decay"] == 0.05  # biases keep theirs
    grouped = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    trained = [p for params, _ in trainer.parts.values() for p in params]
    assert len(grouped) == len(trained) and {id(p) for p in grouped} == {id(p) for p in trained}


def test_resumes_a_checkpoint_saved_with_the_older_one_group_per_part_layout(
    synthetic_data: Path, tmp_path: Path
) -> None:
    cfg = load_config("tiny", None, _overrides(synthetic_data, tmp_path / "c"))
    old = Trainer(cfg, tmp_path / "r").setup()
    # The optimizer and schedule exactly as they were built before the no-decay groups.
    heads, backbone = old.parts["heads"][0], old.parts["backbone"][0]
    optim = cfg.optim
    old.optimizer = torch.optim.AdamW(
        [{"params": heads, "lr": optim.lr}, {"params": backbone, "lr": optim.backbone_lr}],
        weight_decay=optim.weight_decay,
    )
    total = old.steps_per_epoch * optim.epochs
    old.scheduler = torch.optim.lr_scheduler.LambdaLR(old.optimizer, lambda s: lr_factor(s, optim.warmup_steps, total))
    old.fit()  # writes last.pt with the old optimizer state
    saved = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=False)
    assert len(saved["optimizer"]["param_groups"]) == 2

    two_epochs = load_config("tiny", None, [*_overrides(synthetic_data, tmp_path / "c"), "epochs=2"])
    resumed = Trainer(two_epochs, tmp_path / "r", resume=True).setup()
    assert resumed.start_epoch == 1 and resumed.step == old.step > 0
    for part in ("heads", "backbone"):
        for before, after in zip(old.parts[part][0], resumed.parts[part][0], strict=True):
            saved, loaded = old.optimizer.state[before], resumed.optimizer.state[after]
            assert torch.equal(saved["exp_avg"], loaded["exp_avg"])
            assert torch.equal(saved["exp_avg_sq"], loaded["exp_avg_sq"])
            group = _group_of(resumed.optimizer, after)
            assert group["lr"] == _group_of(old.optimizer, before)["lr"]
            assert group["weight_decay"] == (optim.weight_decay if after.ndim > 0 else 0.0)
    assert (
        len(resumed.scheduler.base_lrs) == len(resumed.optimizer.param_groups) == 3
    )  # heads, heads_no_decay, backbone
    assert resumed.scheduler.last_epoch == old.scheduler.last_epoch
    resumed.fit()  # the second epoch steps the regrouped optimizer
    assert resumed.step == 2 * old.step


def test_upgrade_refuses_groups_that_do_not_match_the_parts() -> None:
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    legacy = torch.optim.AdamW([{"params": list(a.parameters())}, {"params": list(b.parameters())}])
    parts = {"heads": list(a.parameters())}
    current = torch.optim.AdamW(build_param_groups({"heads": (parts["heads"], 1e-3)}, 0.1))
    with pytest.raises(ValueError, match="do not match"):
        upgrade_optimizer_state(legacy.state_dict(), {}, current, parts)
