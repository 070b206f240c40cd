"""Training config: groups, recipes, YAML files, flat and dotted `key=value` overrides and validation messages."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import yaml

from imgtxt.errors import ConfigError
from trainer.config import FLAT_KEYS, GROUPS, TrainConfig, flat_view, load_config, save_config
from trainer.model import ModelSpec

# The one-level keys of the config before it was grouped (minus the dead `num_workers`): recipes, `--set`, YAML
# files and the configs saved in older checkpoints use them, so every one must keep working.
_FLAT_GRAMMAR = [
    "data",
    "train_split",
    "val_split",
    "train_limit",
    "val_limit",
    "dev_images",
    "image_backbone",
    "text_backbone",
    "pretrained",
    "dim",
    "pooling",
    "image_size",
    "train_image_size",
    "flip_average",
    "max_tokens",
    "with_unit",
    "head_dropout",
    "local_dim",
    "local_weight",
    "image_trainable_stages",
    "text_trainable_layers",
    "cache_features",
    "cache_dir",
    "cache_views",
    "augment",
    "feature_drop",
    "sampling",
    "neighbour_batches_from",
    "neighbour_clusters",
    "lexical_neighbours",
    "epochs",
    "batch_size",
    "lr",
    "backbone_lr",
    "weight_decay",
    "warmup_steps",
    "grad_clip",
    "ema_decay",
    "losses",
    "loss_kwargs",
    "unit_loss_weight",
    "seed",
    "device",
    "precision",
    "encode_batch_size",
    "log_every",
]


def test_layers_apply_in_order(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("epochs: 3\nlr: 0.01\npooling: gpo\n")
    cfg = load_config(
        "tiny", file, ["epochs=5", "backbone_lr=5e-4", "losses={vsepp_triplet: 1.0, infonce: 0.5}", "data=/x/no"]
    )
    assert cfg.model.image_backbone == "tiny"  # recipe
    assert cfg.optim.lr == 0.01 and cfg.model.pooling == "gpo"  # file
    assert cfg.optim.epochs == 5  # override beats file
    assert cfg.optim.backbone_lr == 5e-4
    assert cfg.loss.weights == {"vsepp_triplet": 1.0, "infonce": 0.5}
    assert cfg.data.path == "/x/no"  # strings verbatim (YAML would read `no` as False)


def test_every_flat_key_maps_to_exactly_one_field() -> None:
    assert sorted(FLAT_KEYS) == sorted(_FLAT_GRAMMAR)
    fields = [f"{g}.{f.name}" for g, cls in GROUPS.items() for f in dataclasses.fields(cls)]
    assert sorted(FLAT_KEYS.values()) == sorted(fields)


def test_dotted_and_flat_keys_set_the_same_field(tmp_path: Path) -> None:
    flat = load_config("tiny", None, ["lr=1e-2", "cache_dir=/c", "losses={center: 1.0}", "unit_loss_weight=0"])
    dotted = load_config(
        "tiny", None, ["optim.lr=1e-2", "cache.dir=/c", "loss.weights={center: 1.0}", "loss.unit_weight=0"]
    )
    assert flat == dotted
    assert (dotted.optim.lr, dotted.cache.dir, dotted.loss.weights, dotted.loss.unit_weight) == (
        1e-2,
        "/c",
        {"center": 1.0},
        0.0,
    )
    grouped = tmp_path / "grouped.yaml"
    grouped.write_text("optim: {lr: 0.01}\ncache: {dir: /c}\nloss: {weights: {center: 1.0}, unit_weight: 0}\n")
    assert load_config("tiny", grouped) == flat


def test_round_trip_through_yaml_is_grouped(tmp_path: Path) -> None:
    cfg = load_config("default", None, ["dim=256"])
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert list(saved) == list(GROUPS) and saved["model"]["dim"] == 256
    assert load_config(None, tmp_path / "config.yaml") == cfg


def test_a_flat_config_of_the_older_layout_still_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """config.yaml of a run made before the groups (every key flat, `num_workers` included) resolves the same."""
    old = {**flat_view(load_config("default", None, ["dim=256"]).to_dict()), "num_workers": 0}
    assert sorted(old) == sorted([*_FLAT_GRAMMAR, "num_workers"])
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    with caplog.at_level(logging.WARNING, logger="trainer.config"):
        assert load_config(None, tmp_path / "old.yaml") == load_config("default", None, ["dim=256"])
    assert "num_workers" in caplog.text  # the dead key is ignored, loudly


def test_flat_view_gives_the_older_flat_keys() -> None:
    cfg = load_config("tiny", None, ["losses={quantization: 1.0}", "loss_kwargs={quantization: {mode: binary}}"])
    flat = flat_view({**cfg.to_dict(), "export": {"flip_average": False}})
    assert flat["losses"] == {"quantization": 1.0} and flat["loss_kwargs"] == {"quantization": {"mode": "binary"}}
    assert flat["data"] == "" and flat["export"] == {"flip_average": False}  # other keys pass through
    assert TrainConfig.from_dict({k: v for k, v in flat.items() if k != "export"}) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["nope=1"], "unknown config key 'nope'"),
        (["optim.nope=1"], "unknown config key 'optim.nope'"),
        (["epochs=many"], "expects int"),
        (["pooling=max"], "mean"),
        (["image_backbone=resnet"], "efficientnet-lite0"),
        (["sampling=random"], "caption"),
        (["device=tpu"], "cuda"),
        (["losses={infonse: 1.0}"], r"unknown loss.*infonse.*valid: .*infonce"),
        (["local_dim=8"], "with_unit=false"),
        (["image_size=4"], "image_size must be 0"),
        (["epochs"], "key=value"),
    ],
)
def test_bad_overrides_name_the_problem(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", None, overrides)


def test_a_field_given_twice_in_one_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("lr: 0.1\noptim: {lr: 0.2}\n")
    with pytest.raises(ConfigError, match=r"'optim\.lr' is given twice"):
        load_config(None, tmp_path / "c.yaml")


def test_unknown_recipe() -> None:
    with pytest.raises(ConfigError, match="tiny"):
        load_config("huge")


def test_native_image_size() -> None:
    assert ModelSpec(image_backbone="efficientnet-lite2").resolved().image_size == 260
    assert ModelSpec(image_backbone="tiny").resolved().image_size == 32
    assert ModelSpec(image_backbone="tiny", image_size=48).resolved().image_size == 48
    cfg = load_config("tiny", None, ["image_size=48"])
    assert cfg.resolved_train_image_size == 48
    assert load_config("tiny", None, ["image_size=48", "train_image_size=40"]).resolved_train_image_size == 40


def test_implied_losses_follow_the_model() -> None:
    cfg = load_config("tiny")
    assert cfg.loss.weights_for(cfg.model) == {"infonce": 1.0, "unit_hinge": 0.1}
    hier = load_config("tiny", None, ["with_unit=false", "local_dim=8", "losses={infonce: 1.0, local_similarity: 0.5}"])
    assert hier.loss.weights_for(hier.model) == {"infonce": 1.0, "local_similarity": 0.5}  # configured weight wins


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["losses={infonce: 1.0}"], "image"),  # InfoNCE does not mind: the faster image-major batches
        (["losses={vsepp_triplet: 1.0}"], "caption"),  # hinge losses want other images' captions as negatives
        (["losses={bcls: 1.0}"], "caption"),
        (["losses={adaptive_margin_triplet: 1.0, center: 0.1}"], "caption"),
        (["losses={vsepp_triplet: 1.0, relation: 1.0}"], "caption"),  # HREM's setting
        (["losses={infonce: 1.0}", "neighbour_batches_from=2"], "image"),  # neighbour batches are groups of images
        (["losses={vsepp_triplet: 1.0}", "sampling=image"], "image"),  # an explicit choice is kept (and logged)
    ],
)
def test_each_loss_gets_the_batch_it_needs_by_default(overrides: list[str], expected: str) -> None:
    from trainer.train import resolve_sampling

    cfg = load_config("quick", None, overrides)
    assert resolve_sampling(cfg).data.sampling == expected


def test_an_explicit_batch_against_a_loss_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    from trainer.train import resolve_sampling

    resolve_sampling(load_config("quick", None, ["losses={vsepp_triplet: 1.0}", "sampling=image"]))
    assert "vsepp_triplet work best with caption batches" in caplog.text
