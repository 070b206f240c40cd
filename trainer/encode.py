"""Encoding a whole split with the PyTorch towers (for validation during training and `imgtxt eval --checkpoint`)."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from trainer.data import CaptionTable, TowerInputs
from trainer.model import DualEncoder


class Source(Protocol):
    """Anything that yields the trainable towers' inputs for image and caption indices."""

    def images(self, image_idx: np.ndarray, augment: bool = False) -> Tensor: ...

    def texts(self, caption_idx: np.ndarray) -> tuple[Tensor, Tensor]: ...

    def batch(self, image_idx: np.ndarray, caption_idx: np.ndarray, augment: bool = False) -> TowerInputs: ...


def _chunks(n: int, batch_size: int) -> list[np.ndarray]:
    return np.array_split(np.arange(n), max(1, -(-n // batch_size)))


@torch.no_grad()
def encode_images(
    model: DualEncoder, source: Source, n_images: int, image_split: int, batch_size: int, device: torch.device
) -> np.ndarray:
    """(n_images, D) float32 unit-norm image embeddings of a split, in eval mode."""
    was_training = model.training
    model.eval()
    out = [
        model.image.forward_from(source.images(idx).to(device).float(), image_split).float().cpu()
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
    """(n_images, D) and (n_captions, D) float32 unit-norm embeddings of a split, in eval mode."""
    was_training = model.training
    model.eval()
    images = encode_images(model, source, len(table.images), image_split, batch_size, device)
    txt_out = []
    for idx in _chunks(len(table.captions), batch_size):
        hidden, mask = source.texts(idx)
        txt_out.append(model.text.forward_from(hidden.to(device).float(), mask.to(device), text_split).float().cpu())
    model.train(was_training)
    return images, torch.cat(txt_out).numpy()
