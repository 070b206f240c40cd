"""Training config: recipes, YAML files, `key=value` overrides and validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgtxt.errors import ConfigError
from trainer.config import TrainConfig, load_config, save_config


def test_layers_apply_in_order(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("epochs: 3\nlr: 0.01\npooling: gpo\n")
    cfg = load_config(
        "tiny", file, ["epochs=5", "backbone_lr=5e-4", "losses={vsepp_triplet: 1.0, infonce: 0.5}", "data=/x/no"]
    )
    assert cfg.image_backbone == "tiny"  # recipe
    assert cfg.lr == 0.01 and cfg.pooling == "gpo"  # file
    assert cfg.epochs == 5  # override beats file
    assert cfg.backbone_lr == 5e-4
    assert cfg.losses == {"vsepp_triplet": 1.0, "infonce": 0.5}
    assert cfg.data == "/x/no"  # strings verbatim (YAML would read `no` as False)


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config("default", None, ["dim=256"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(None, tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["nope=1"], "unknown config key 'nope'"),
        (["epochs=many"], "expects int"),
        (["pooling=max"], "mean"),
        (["image_backbone=resnet"], "efficientnet-lite0"),
        (["epochs"], "key=value"),
    ],
)
def test_bad_overrides_name_the_problem(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", None, overrides)


def test_unknown_recipe() -> None:
    with pytest.raises(ConfigError, match="tiny"):
        load_config("huge")


def test_native_image_size() -> None:
    assert TrainConfig(image_backbone="efficientnet-lite2").resolved_image_size == 260
    assert TrainConfig(image_backbone="tiny").resolved_image_size == 32
