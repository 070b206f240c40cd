"""Encoding a whole split with the PyTorch towers (for validation during training and `imgtxt eval --checkpoint`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from trainer.data.cache import cached_features
from trainer.data.captions import CaptionTable
from trainer.data.sources import CachedSource, Source
from trainer.model import DualEncoder, mirror_mean


def split_points(model: DualEncoder, image_trainable_stages: int, text_trainable_layers: int) -> tuple[int, int]:
    """(image_split, text_split): where each tower's trained part starts, i.e. where its frozen activations are
    cached, for `optim.image_trainable_stages` and `optim.text_trainable_layers`."""
    image_split = model.image.num_stages - min(image_trainable_stages, model.image.num_stages)
    return image_split, max(1, model.text.num_stages - text_trainable_layers)


def _chunks(n: int, batch_size: int) -> list[np.ndarray]:
    return np.array_split(np.arange(n), max(1, -(-n // batch_size)))


@torch.no_grad()
def encode_images(
    model: DualEncoder,
    source: Source,
    n_images: int,
    image_split: int,
    batch_size: int,
    device: torch.device,
    flip_average: bool = False,
) -> np.ndarray:
    """(n_images, D) float32 unit-norm image embeddings of a split, in eval mode.

    `flip_average`: each embedding is `mirror_mean` of the image's and its mirrored view's (the source's
    `mirror=True` inputs), as the flip-averaged image graph serves it.
    """
    was_training = model.training
    model.eval()

    def embed(idx: np.ndarray, mirror: bool) -> Tensor:
        h = source.images(idx, mirror=mirror).to(device).float()
        return model.image.forward_from(h, image_split).float().cpu()

    out = [
        mirror_mean(embed(idx, False), embed(idx, True)) if flip_average else embed(idx, False)
        for idx in _chunks(n_images, batch_size)
    ]
    model.train(was_training)
    return torch.cat(out).numpy()


@torch.no_grad()
def encode_split(
    model: DualEncoder,
    source: Source,
    table: CaptionTable,
    image_split: int,
    text_split: int,
    batch_size: int,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """(n_images, D) and (n_captions, D) float32 unit-norm served embeddings of a split (flip-averaged images when
    the model is: `ModelSpec.flip_average`), in eval mode."""
    was_training = model.training
    model.eval()
    images = encode_images(model, source, len(table.images), image_split, batch_size, device, model.spec.flip_average)
    txt_out = []
    for idx in _chunks(len(table.captions), batch_size):
        hidden, mask = source.texts(idx)
        txt_out.append(model.text.forward_from(hidden.to(device).float(), mask.to(device), text_split).float().cpu())
    model.train(was_training)
    return images, torch.cat(txt_out).numpy()


def encode_checkpoint_cached(
    checkpoint: Path, table: CaptionTable, cache_dir: Path, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """A training checkpoint's served embeddings of a split, from that split's frozen activations in the feature
    cache (computed there on a miss), as its validation during training measured them."""
    from trainer.checkpoint import load_checkpoint  # trainer.checkpoint imports the config, which imports this

    loaded = load_checkpoint(checkpoint)
    model, optim = loaded.model, loaded.config["optim"]
    splits = split_points(model, optim["image_trainable_stages"], optim["text_trainable_layers"])
    mirror = model.spec.flip_average
    store = cached_features(model, table, *splits, cache_dir, batch_size, desc="eval", mirror=mirror)
    assert store is not None  # build=True computes a missing cache
    return encode_split(model, CachedSource(store), table, *splits, batch_size, torch.device("cpu"))
