"""Training configuration: one frozen dataclass, built from a recipe, a YAML file and `key=value` overrides."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imgtxt.errors import ConfigError
from trainer.model import IMAGE_BACKBONES, POOLINGS, TEXT_BACKBONES, ModelSpec, efficientnet_image_size

DEVICES = ("auto", "cpu", "cuda")
SAMPLINGS = ("caption", "image")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; saved in `config.yaml`, every checkpoint and the exported bundle."""

    data: str = ""
    """Dataset file or directory (Karpathy `dataset_*.json` or JSONL); empty: `$IMGTXT_DATA` or Flickr8k beside."""
    train_split: str = "train"
    """Split to train on."""
    val_split: str = "val"
    """Split to select checkpoints on."""
    train_limit: int = 0
    """Use at most this many training images (0: all)."""
    val_limit: int = 0
    """Use at most this many validation images (0: all)."""
    image_backbone: str = "efficientnet-lite0"
    """Image backbone: tiny | efficientnet-lite0 | efficientnet-lite1 | efficientnet-lite2."""
    text_backbone: str = "minilm"
    """Text backbone: tiny | minilm (all-MiniLM-L6-v2)."""
    pretrained: bool = True
    """Load pretrained backbone weights (ImageNet / MiniLM)."""
    dim: int = 512
    """Dimension of the shared embedding space."""
    pooling: str = "mean"
    """Pooling of local features: mean | gpo."""
    image_size: int = 0
    """Image input side served (bundle contract, validation, evaluation); 0: the backbone's native size (224/240/260;
    32 for tiny)."""
    train_image_size: int = 0
    """Side of the training views (random resized crops, cached views); 0: image_size. Random resized crops make
    objects look larger than the evaluation transform does, so serving at a larger side than the crops matches their
    apparent size ("FixRes", Touvron et al. 2019); the towers are fully convolutional + pooled, any side works."""
    flip_average: bool = False
    """Serve image embeddings flip-averaged: the normalised mean of the image's and its mirror image's (test-time
    augmentation; ~2x image encode cost, text side unchanged). Validation measures it (a mirrored view of the val
    split is cached) and `imgtxt export` writes the flip-averaged image graph unless `--no-flip-average`."""
    max_tokens: int = 64
    """Tokens per caption, special tokens included."""
    with_unit: bool = True
    """Also train/export the (image, caption) fusion head."""
    head_dropout: float = 0.0
    """Dropout on pooled backbone features before the projection heads (regularises heads on frozen features)."""
    local_dim: int = 0
    """Hierarchical option: local embedding size (trained with the `local_similarity` loss on lexical labels),
    concatenated to the global one in the served vector. Needs with_unit=false. 0: off."""
    image_trainable_stages: int = 0
    """Top image backbone stages to fine-tune (0: heads only). Stages below are frozen and their output cached."""
    text_trainable_layers: int = 0
    """Top text transformer layers to fine-tune (0: heads only)."""
    cache_features: bool = True
    """Cache frozen-backbone activations on disk (no image augmentation then); False: run from pixels, augmented."""
    cache_dir: str = ""
    """Feature cache directory; empty: `$IMGTXT_CACHE` or ~/.cache/imgtxt."""
    cache_views: int = 1
    """Image views cached per training image: the evaluation transform plus `cache_views - 1` seeded random resized
    crops + flips (the shared `imgtxt.preprocess` augmentation); each step picks one view per image at random."""
    augment: bool = True
    """Augment training images: random resized crop + flip from pixels, or a random cached view (cache_views > 1)."""
    feature_drop: float = 0.0
    """Fraction of local features (image grid cells, caption tokens) randomly left out of the pooling while training
    (VSE∞'s feature-size augmentation; works on cached activations)."""
    sampling: str = "caption"
    """Batch composition. caption: `batch_size` random captions (an image may repeat); image: `batch_size` random
    images with all their captions, so each image goes through its tower once for ~5 captions (several positives
    per image in the losses). An epoch visits every caption once either way."""
    neighbour_batches_from: int = 0
    """HREM's neighbour batch sampling from this epoch on (1-based; 0: never): each epoch k-means over the current
    image embeddings of the training split, and batches of `neighbour_clusters` nearby clusters x
    batch_size / neighbour_clusters images (with all their captions). Needs sampling=image."""
    neighbour_clusters: int = 8
    """P, clusters per neighbour batch."""
    epochs: int = 10
    """Passes over all training captions."""
    batch_size: int = 128
    """Per step and process: captions (sampling=caption) or images, each with all its captions (sampling=image).
    Under `torchrun` the losses see the global batch of all processes (N x batch_size), gathered with gradients."""
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
    losses: dict[str, float] = field(default_factory=lambda: {"infonce": 1.0})
    """Loss name -> weight (names from trainer.losses: infonce, vsepp_triplet, adaptive_margin_triplet, ...)."""
    loss_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Loss name -> constructor keyword arguments."""
    unit_loss_weight: float = 0.1
    """Weight of the unit-hinge loss when `with_unit` (0: fusion head left untrained)."""
    seed: int = 0
    """Seed of every random generator (model init, shuffling, augmentation)."""
    device: str = "auto"
    """auto | cpu | cuda."""
    precision: str = "auto"
    """auto (bf16 on CUDA when supported, else fp32) | fp32 | bf16 | fp16 (autocast; CUDA only)."""
    num_workers: int = 0
    """Data loader worker processes when training from pixels."""
    encode_batch_size: int = 64
    """Batch size for feature caching and evaluation."""
    log_every: int = 50
    """Steps between structured training log lines."""

    def __post_init__(self) -> None:
        checks = [
            (self.image_backbone in IMAGE_BACKBONES, f"image_backbone must be one of {IMAGE_BACKBONES}"),
            (self.text_backbone in TEXT_BACKBONES, f"text_backbone must be one of {TEXT_BACKBONES}"),
            (self.pooling in POOLINGS, f"pooling must be one of {POOLINGS}"),
            (self.device in DEVICES, f"device must be one of {DEVICES}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"),
            (self.sampling in SAMPLINGS, f"sampling must be one of {SAMPLINGS}"),
            (0.0 <= self.feature_drop < 1.0, "feature_drop must be in [0, 1)"),
            (self.cache_views >= 1, "cache_views must be >= 1"),
            (self.image_size >= 0 and self.train_image_size >= 0, "image sizes must be >= 0"),
            (0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)"),
            (self.neighbour_batches_from >= 0 and self.neighbour_clusters >= 1, "neighbour_* must be >= 0 / >= 1"),
            (
                self.sampling == "image" or not self.neighbour_batches_from,
                "neighbour_batches_from needs sampling=image",
            ),
            (self.epochs >= 1 and self.batch_size >= 2, "epochs >= 1 and batch_size >= 2 required"),
            (self.lr > 0 and self.backbone_lr >= 0, "lr > 0 and backbone_lr >= 0 required"),
            (self.image_trainable_stages >= 0 and self.text_trainable_layers >= 0, "trainable counts must be >= 0"),
            (self.train_limit >= 0 and self.val_limit >= 0, "limits must be >= 0"),
            (self.local_dim >= 0 and not (self.local_dim and self.with_unit), "local_dim > 0 needs with_unit=false"),
            (bool(self.losses) and all(w >= 0 for w in self.losses.values()), "losses needs name: weight >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def resolved_image_size(self) -> int:
        """The image side actually used."""
        if self.image_size:
            return self.image_size
        return 32 if self.image_backbone == "tiny" else efficientnet_image_size(self.image_backbone)

    @property
    def resolved_train_image_size(self) -> int:
        """The side of the training views."""
        return self.train_image_size or self.resolved_image_size

    def model_spec(self) -> ModelSpec:
        """The model part of the config."""
        return ModelSpec(
            image_backbone=self.image_backbone,
            text_backbone=self.text_backbone,
            dim=self.dim,
            pooling=self.pooling,
            image_size=self.resolved_image_size,
            max_tokens=self.max_tokens,
            with_unit=self.with_unit,
            pretrained=self.pretrained,
            local_dim=self.local_dim,
            head_dropout=self.head_dropout,
            flip_average=self.flip_average,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (YAML/JSON ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Builds a config, rejecting unknown keys by name."""
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}; valid: {', '.join(field_names())}")
        return cls(**d)


def field_names() -> list[str]:
    """Names of all config fields."""
    return [f.name for f in dataclasses.fields(TrainConfig)]


RECIPES: dict[str, dict[str, Any]] = {
    # Seconds on CPU: random tiny towers, a handful of images. For tests and smoke runs.
    "tiny": dict(
        image_backbone="tiny", text_backbone="tiny", pretrained=False, dim=32, max_tokens=32, epochs=1, batch_size=8,
        train_limit=20, val_limit=10, warmup_steps=0, lr=1e-3, log_every=1, encode_batch_size=16,
    ),
    # A few minutes on 2 CPU cores: heads only, on cached frozen EfficientNet-Lite0 + MiniLM features; image-major
    # batches (128 images x 5 captions) with feature dropout: val rSum 261.7 (README, Trainer figures).
    "quick": dict(
        epochs=20, batch_size=128, sampling="image", feature_drop=0.2, lr=5e-4, weight_decay=0.05, head_dropout=0.2,
        warmup_steps=20, losses={"infonce": 1.0},
    ),
    # About 80 min on 2 CPU cores: EfficientNet-Lite2 + MiniLM; fine-tunes the image backbone's top 8 stages (the last
    # 112-channel block at 17x17, the 9x9 blocks, head conv) and all 6 MiniLM layers from activations cached below
    # them (5 cached views per training image: eval transform + 4 random resized crops/flips), image-major batches,
    # feature dropout, InfoNCE at temperature 0.05, weight average (EMA), flip-averaged image embeddings validated and
    # exported, 8 epochs: val rSum 338.1 (334.4 single view) (README, Trainer figures).
    "default": dict(
        image_backbone="efficientnet-lite2", epochs=8, batch_size=128, sampling="image", feature_drop=0.2,
        cache_views=5, lr=5e-4, backbone_lr=1e-4, weight_decay=0.05, head_dropout=0.2, warmup_steps=50,
        image_trainable_stages=8, text_trainable_layers=6, ema_decay=0.995, flip_average=True,
        losses={"infonce": 1.0}, loss_kwargs={"infonce": {"init_temperature": 0.05}},
    ),
}  # fmt: skip


def _coerce(name: str, raw: str) -> Any:
    """Parses an override value with YAML (so `1e-3`, `true`, `{infonce: 1.0}` work), checked against the field type."""
    hints = typing.get_type_hints(TrainConfig)
    if name not in hints:
        raise ConfigError(f"unknown config key {name!r}; valid: {', '.join(field_names())}")
    kind = hints[name]
    if kind is str:
        return raw  # paths and names verbatim (YAML would turn `no` into False)
    if kind is float:
        try:
            return float(raw)  # YAML 1.1 reads `5e-4` (no dot) as a string
        except ValueError:
            raise ConfigError(f"config key {name!r} expects float, got {raw!r}") from None
    value = yaml.safe_load(raw)
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    origin = typing.get_origin(kind) or kind
    if not isinstance(value, origin) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"config key {name!r} expects {getattr(kind, '__name__', kind)}, got {raw!r}")
    return value


def load_config(
    recipe: str | None = None, config_file: Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """Resolves a config: defaults < recipe < YAML file < `key=value` overrides.

    Raises:
        ConfigError: Unknown recipe or key, malformed override, or a value of the wrong type.
    """
    values: dict[str, Any] = {}
    if recipe is not None:
        if recipe not in RECIPES:
            raise ConfigError(f"recipe must be one of {tuple(RECIPES)}, got {recipe!r}")
        values.update(RECIPES[recipe])
    if config_file is not None:
        loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config_file} must hold a mapping of config keys")
        values.update(loaded)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override must look like key=value, got {item!r}")
        values[key.strip()] = _coerce(key.strip(), raw.strip())
    return TrainConfig.from_dict(values)


def save_config(cfg: TrainConfig, path: Path) -> None:
    """Writes the resolved config as YAML."""
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
