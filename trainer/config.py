"""Training configuration: frozen dataclasses in groups, built from a recipe, a YAML file and `key=value` overrides.

`TrainConfig` holds one group per concern: `data` (examples, batches, augmentation), `model` (`ModelSpec`: what the
dual encoder is built from), `optim` (what trains, how fast, how long), `loss`, `cache` and `run`. A key is
written either flat, as it always was (`lr`, `cache_dir`, `losses`), or as `GROUP.FIELD` (`optim.lr`, `cache.dir`,
`loss.weights`); YAML files and saved configs may also nest the groups (`optim: {lr: 1e-3}`). `FLAT_KEYS` maps every
flat key to its field. The resolved config is saved grouped (`TrainConfig.to_dict`); flat configs of older
checkpoints and run directories still load.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imgtxt.errors import ConfigError
from trainer.losses import LOSSES
from trainer.model import ModelSpec

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
SAMPLINGS = ("auto", "caption", "image")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class DataConfig:
    """Which images and captions train and validate, in which batches, and how training images are augmented."""

    path: str = ""
    """Dataset file or directory (Karpathy `dataset_*.json` or JSONL); empty: `$IMGTXT_DATA` or Flickr8k beside.
    Flat key `data`."""
    train_split: str = "train"
    """Split to train on."""
    val_split: str = "val"
    """Split to select checkpoints on."""
    train_limit: int = 0
    """Use at most this many training images (0: all)."""
    val_limit: int = 0
    """Use at most this many validation images (0: all)."""
    dev_images: int = 0
    """Hold out the last N images of the training split (after `train_limit`) as a dev split: they are never
    trained on, and the epoch kept as best.pt is chosen by their rSum instead of the validation split's, so the
    validation figures of the chosen epoch are not selected on themselves (0: select on `val_split`, the old
    protocol). The held-out images come from the full training split's feature cache, which stays valid."""
    sampling: str = "auto"
    """Batch composition: auto | caption | image. caption: `batch_size` random captions (an image may repeat); image:
    `batch_size` random images with all their captions, so each image goes through its tower once for ~5 captions
    (several positives per image in the losses). An epoch visits every caption once either way. auto: what the
    losses need (each loss declares its batch: the hinge losses want caption-major batches, whose hardest negatives
    are other images' captions; InfoNCE is at home in image-major ones), image when none minds; neighbour batches
    need image."""
    batch_size: int = 128
    """Per step and process: captions (sampling=caption) or images, each with all its captions (sampling=image).
    Under `torchrun` the losses see the global batch of all processes (N x batch_size), gathered with gradients."""
    neighbour_batches_from: int = 0
    """HREM's neighbour batch sampling from this epoch on (1-based; 0: never): each epoch k-means over the current
    image embeddings of the training split, and batches of `neighbour_clusters` nearby clusters x
    batch_size / neighbour_clusters images (with all their captions). Needs sampling=image."""
    neighbour_clusters: int = 8
    """P, clusters per neighbour batch."""
    lexical_neighbours: int = 0
    """Lexical neighbour batches (`trainer.data.lexical`), for the hierarchical option's local hinge: every image
    comes in a group of this many images whose captions share the most content words with its own, groups dealt
    whole into the batches (regrouped each epoch, seeded; 0: off, else >= 2 and <= batch_size). Needs
    sampling=image; not with neighbour_batches_from."""
    augment: bool = True
    """Augment training images: random resized crop + flip from pixels, or a random cached view (cache.views > 1)."""
    feature_drop: float = 0.0
    """Fraction of local features (image grid cells, caption tokens) randomly left out of the pooling while training
    (VSE∞'s feature-size augmentation; works on cached activations)."""
    train_image_size: int = 0
    """Side of the training views (random resized crops, cached views); 0: model.image_size. Random resized crops
    make objects look larger than the evaluation transform does, so serving at a larger side than the crops matches
    their apparent size ("FixRes", Touvron et al. 2019); the towers are fully convolutional + pooled, any side works."""

    def __post_init__(self) -> None:
        _check(self.sampling in SAMPLINGS, f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        _check(self.train_limit >= 0 and self.val_limit >= 0, "limits must be >= 0")
        _check(self.dev_images >= 0, f"dev_images must be >= 0, got {self.dev_images}")
        _check(self.batch_size >= 2, f"batch_size must be >= 2, got {self.batch_size}")
        _check(self.neighbour_batches_from >= 0 and self.neighbour_clusters >= 1, "neighbour_* must be >= 0 / >= 1")
        _check(
            self.sampling in ("image", "auto") or not self.neighbour_batches_from,
            "neighbour_batches_from needs sampling=image",
        )
        _check(
            self.lexical_neighbours == 0 or 2 <= self.lexical_neighbours <= self.batch_size,
            f"lexical_neighbours must be 0 or in [2, batch_size={self.batch_size}], got {self.lexical_neighbours}",
        )
        _check(
            self.sampling in ("image", "auto") or not self.lexical_neighbours,
            "lexical_neighbours needs sampling=image",
        )
        _check(
            not (self.lexical_neighbours and self.neighbour_batches_from),
            "lexical_neighbours and neighbour_batches_from are two batch orders: choose one",
        )
        _check(0.0 <= self.feature_drop < 1.0, f"feature_drop must be in [0, 1), got {self.feature_drop}")
        _check(self.train_image_size >= 0, f"train_image_size must be >= 0, got {self.train_image_size}")


@dataclass(frozen=True)
class OptimConfig:
    """What trains (the top backbone stages above the heads), at which learning rates, for how long."""

    epochs: int = 10
    """Passes over all training captions."""
    lr: float = 1e-3
    """Peak learning rate of the heads (cosine decay after warm-up)."""
    backbone_lr: float = 5e-5
    """Peak learning rate of fine-tuned backbone stages."""
    weight_decay: float = 1e-4
    """AdamW weight decay of weight matrices and kernels; biases, norm gains and InfoNCE's logit scale get none."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    grad_clip: float = 2.0
    """Gradient norm clip (0: off)."""
    ema_decay: float = 0.0
    """Exponential moving average of the trained weights (0: off): validation, best.pt and so the exported bundle use
    the averaged weights; the optimizer keeps stepping the raw ones (last.pt holds both, for --resume)."""
    image_trainable_stages: int = 0
    """Top image backbone stages to fine-tune (0: heads only). Stages below are frozen and their output cached."""
    text_trainable_layers: int = 0
    """Top text transformer layers to fine-tune (0: heads only)."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _check(self.lr > 0 and self.backbone_lr >= 0, "lr > 0 and backbone_lr >= 0 required")
        _check(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        _check(self.image_trainable_stages >= 0 and self.text_trainable_layers >= 0, "trainable counts must be >= 0")


@dataclass(frozen=True)
class LossConfig:
    """What training minimises: registered losses (`trainer.losses`) and their weights."""

    weights: dict[str, float] = field(default_factory=lambda: {"infonce": 1.0})
    """Loss name -> weight (flat key `losses`; names from trainer.losses: infonce, vsepp_triplet, ...)."""
    kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Loss name -> constructor keyword arguments (flat key `loss_kwargs`)."""
    unit_weight: float = 0.1
    """Weight of the unit-hinge loss when the model has a unit head (flat key `unit_loss_weight`; 0: fusion head
    left untrained)."""

    def __post_init__(self) -> None:
        _check(bool(self.weights) and all(w >= 0 for w in self.weights.values()), "losses needs name: weight >= 0")
        unknown = sorted(set(self.weights) - set(LOSSES))
        _check(not unknown, f"unknown loss(es) {', '.join(unknown)}; valid: {', '.join(sorted(LOSSES))}")

    def weights_for(self, model: ModelSpec) -> dict[str, float]:
        """The losses trained with `model`: the configured ones, plus `unit_hinge` (weight `unit_weight`) when the
        model has a unit head and `local_similarity` (weight 1) with the hierarchical option, unless configured."""
        weights = dict(self.weights)
        if model.with_unit and self.unit_weight > 0:
            weights.setdefault("unit_hinge", self.unit_weight)
        if model.local_dim:
            weights.setdefault("local_similarity", 1.0)
        return weights


@dataclass(frozen=True)
class CacheConfig:
    """The on-disk cache of frozen-backbone activations (`trainer.data.cache`)."""

    features: bool = True
    """Cache frozen-backbone activations on disk (no image augmentation then but cached views); False: run from
    pixels, augmented. Flat key `cache_features`."""
    dir: str = ""
    """Feature cache directory; empty: `$IMGTXT_CACHE` or ~/.cache/imgtxt. Flat key `cache_dir`."""
    views: int = 1
    """Image views cached per training image: the evaluation transform plus `views - 1` seeded random resized
    crops + flips (the shared `imgtxt.preprocess` augmentation); each step picks one view per image at random. Flat
    key `cache_views`."""

    def __post_init__(self) -> None:
        _check(self.views >= 1, f"cache_views must be >= 1, got {self.views}")


@dataclass(frozen=True)
class RunConfig:
    """Where and how the run executes: seed, device, precision, logging."""

    seed: int = 0
    """Seed of every random generator (model init, shuffling, augmentation)."""
    device: str = "auto"
    """auto | cpu | cuda."""
    precision: str = "auto"
    """auto (bf16 on CUDA when supported, else fp32) | fp32 | bf16 | fp16 (autocast; CUDA only)."""
    encode_batch_size: int = 64
    """Batch size for feature caching and evaluation."""
    log_every: int = 50
    """Steps between structured training log lines."""

    def __post_init__(self) -> None:
        _check(self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}")
        _check(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")


GROUPS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelSpec,
    "optim": OptimConfig,
    "loss": LossConfig,
    "cache": CacheConfig,
    "run": RunConfig,
}
"""Group name -> its dataclass, in the order the saved config lists them."""

_FLAT_NAMES: dict[str, str] = {
    "data.path": "data",
    "loss.weights": "losses",
    "loss.kwargs": "loss_kwargs",
    "loss.unit_weight": "unit_loss_weight",
    "cache.features": "cache_features",
    "cache.dir": "cache_dir",
    "cache.views": "cache_views",
}
"""The flat keys whose name is not their field's name."""

FLAT_KEYS: dict[str, str] = {
    _FLAT_NAMES.get(f"{group}.{f.name}", f.name): f"{group}.{f.name}"
    for group, cls in GROUPS.items()
    for f in dataclasses.fields(cls)
}
"""Flat key (the one-level grammar of recipes, `--set` and older configs) -> `GROUP.FIELD`."""

REMOVED_KEYS = {"num_workers": "the trainer never used data loader workers"}
"""Keys of older configs that no longer mean anything: ignored with a warning, so their checkpoints still load."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; saved in `config.yaml`, every checkpoint and the exported bundle."""

    data: DataConfig = field(default_factory=DataConfig)
    """Examples, batches and augmentation."""
    model: ModelSpec = field(default_factory=ModelSpec)
    """What the dual encoder is built from."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Trained stages, learning rates, schedule, weight average."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Losses and their weights."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """Feature cache."""
    run: RunConfig = field(default_factory=RunConfig)
    """Seed, device, precision, logging."""

    def __post_init__(self) -> None:
        for name, cls in GROUPS.items():
            _check(isinstance(getattr(self, name), cls), f"TrainConfig.{name} must be a {cls.__name__}")
        _check(
            not (self.data.dev_images and self.model.flip_average),
            "dev_images cannot be combined with flip_average (the training cache holds no mirrored views)",
        )

    @property
    def resolved_train_image_size(self) -> int:
        """The side of the training views (`data.train_image_size`, else the served side)."""
        return self.data.train_image_size or self.model.resolved().image_size

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, grouped (YAML/JSON ready)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in GROUPS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Builds a config from groups, `GROUP.FIELD` or flat keys (any mix), rejecting unknown keys by name."""
        return _build(_dotted(d))


def flat_view(d: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config with every group's fields under their flat keys (other keys unchanged): the one-level layout
    that readers of older configs, such as `imgtxt.bundle.trained_quantization`, expect."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if key in GROUPS and isinstance(value, Mapping):
            out.update({_FLAT_NAMES.get(f"{key}.{name}", str(name)): v for name, v in value.items()})
        else:
            out[key] = value
    return out


def _valid_keys() -> str:
    return f"{', '.join(FLAT_KEYS)} (or GROUP.FIELD, groups {', '.join(GROUPS)})"


def _locate(key: str) -> str | None:
    """`GROUP.FIELD` of a flat or dotted key, or None when there is no such key."""
    if key in FLAT_KEYS:
        return FLAT_KEYS[key]
    group, _, name = key.partition(".")
    if group in GROUPS and name in {f.name for f in dataclasses.fields(GROUPS[group])}:
        return key
    return None


def _dotted(d: Mapping[str, Any]) -> dict[str, Any]:
    """Config values keyed `GROUP.FIELD`, from a mapping of groups (`{optim: {lr: 1e-3}}`), dotted and flat keys.

    Raises:
        ConfigError: Unknown keys (all named) or one field given twice.
    """
    items: list[tuple[str, Any]] = []
    for key, value in d.items():
        if key in GROUPS and isinstance(value, Mapping):  # a group; `data: PATH` stays the flat key
            items.extend((f"{key}.{name}", v) for name, v in value.items())
        else:
            items.append((str(key), value))
    out: dict[str, Any] = {}
    unknown = []
    for key, value in items:
        if key in REMOVED_KEYS:
            logger.warning("config key %r is ignored: %s", key, REMOVED_KEYS[key])
            continue
        dotted = _locate(key)
        if dotted is None:
            unknown.append(key)
        elif dotted in out:
            raise ConfigError(f"config key {dotted!r} is given twice (as {key!r} and another key)")
        else:
            out[dotted] = value
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}; valid: {_valid_keys()}")
    return out


def _build(values: Mapping[str, Any]) -> TrainConfig:
    """A config from `GROUP.FIELD` values (defaults for the rest)."""
    groups: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
    for key, value in values.items():
        group, _, name = key.partition(".")
        groups[group][name] = value
    return TrainConfig(**{name: GROUPS[name](**kwargs) for name, kwargs in groups.items()})


RECIPES: dict[str, dict[str, Any]] = {
    # Seconds on CPU: random tiny towers, a handful of images. For tests and smoke runs.
    "tiny": {
        "data": {"train_limit": 20, "val_limit": 10, "batch_size": 8, "sampling": "caption"},
        "model": {"image_backbone": "tiny", "text_backbone": "tiny", "pretrained": False, "dim": 32, "max_tokens": 32},
        "optim": {"epochs": 1, "warmup_steps": 0, "lr": 1e-3},
        "run": {"log_every": 1, "encode_batch_size": 16},
    },
    # A few minutes on 2 CPU cores: heads only, on cached frozen EfficientNet-Lite0 + MiniLM features; image-major
    # batches (128 images x 5 captions) with feature dropout: val rSum 261.7 (README, Trainer figures).
    "quick": {
        "data": {"batch_size": 128, "sampling": "auto", "feature_drop": 0.2},
        "model": {"head_dropout": 0.2},
        "optim": {"epochs": 20, "lr": 5e-4, "weight_decay": 0.05, "warmup_steps": 20},
        "loss": {"weights": {"infonce": 1.0}},
    },
    # About 80 min on 2 CPU cores: EfficientNet-Lite2 + MiniLM; fine-tunes the image backbone's top 8 stages (the last
    # 112-channel block at 17x17, the 9x9 blocks, head conv) and all 6 MiniLM layers from activations cached below
    # them (5 cached views per training image: eval transform + 4 random resized crops/flips), image-major batches,
    # feature dropout, InfoNCE at temperature 0.05, weight average (EMA), flip-averaged image embeddings validated and
    # exported, 8 epochs: val rSum 338.1 (334.4 single view) (README, Trainer figures).
    "default": {
        "data": {"batch_size": 128, "sampling": "auto", "feature_drop": 0.2},
        "model": {"image_backbone": "efficientnet-lite2", "head_dropout": 0.2, "flip_average": True},
        "optim": {
            "epochs": 8,
            "lr": 5e-4,
            "backbone_lr": 1e-4,
            "weight_decay": 0.05,
            "warmup_steps": 50,
            "image_trainable_stages": 8,
            "text_trainable_layers": 6,
            "ema_decay": 0.995,
        },
        "loss": {"weights": {"infonce": 1.0}, "kwargs": {"infonce": {"init_temperature": 0.05}}},
        "cache": {"views": 5},
    },
}
"""Recipe name -> config layer (groups of fields over the defaults)."""


def _coerce(key: str, raw: str) -> Any:
    """Parses an override value with YAML (so `1e-3`, `true`, `{infonce: 1.0}` work), checked against the field type."""
    dotted = _locate(key)
    if dotted is None:
        raise ConfigError(f"unknown config key {key!r}; valid: {_valid_keys()}")
    group, _, name = dotted.partition(".")
    kind = typing.get_type_hints(GROUPS[group])[name]
    if kind is str:
        return raw  # paths and names verbatim (YAML would turn `no` into False)
    if kind is float:
        try:
            return float(raw)  # YAML 1.1 reads `5e-4` (no dot) as a string
        except ValueError:
            raise ConfigError(f"config key {key!r} expects float, got {raw!r}") from None
    value = yaml.safe_load(raw)
    origin = typing.get_origin(kind) or kind
    if not isinstance(value, origin) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"config key {key!r} expects {getattr(kind, '__name__', kind)}, got {raw!r}")
    return value


def load_config(
    recipe: str | None = None, config_file: Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """Resolves a config: defaults < recipe < YAML file < `key=value` overrides (flat or `GROUP.FIELD` keys).

    Raises:
        ConfigError: Unknown recipe or key, malformed override, or a value of the wrong type.
    """
    values: dict[str, Any] = {}
    if recipe is not None:
        if recipe not in RECIPES:
            raise ConfigError(f"recipe must be one of {tuple(RECIPES)}, got {recipe!r}")
        values.update(_dotted(RECIPES[recipe]))
    if config_file is not None:
        loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config_file} must hold a mapping of config keys")
        values.update(_dotted(loaded))
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"override must look like key=value, got {item!r}")
        value = raw.strip() if key in REMOVED_KEYS else _coerce(key, raw.strip())
        values.update(_dotted({key: value}))
    return _build(values)


def save_config(cfg: TrainConfig, path: Path) -> None:
    """Writes the resolved config as YAML, grouped."""
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
