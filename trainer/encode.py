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
    img_out = [
        model.image.forward_from(source.images(idx).to(device).float(), image_split).float().cpu()
        for idx in np.array_split(np.arange(len(table.images)), max(1, -(-len(table.images) // batch_size)))
    ]
    txt_out = []
    for idx in np.array_split(np.arange(len(table.captions)), max(1, -(-len(table.captions) // batch_size))):
        hidden, mask = source.texts(idx)
        txt_out.append(model.text.forward_from(hidden.to(device).float(), mask.to(device), text_split).float().cpu())
    model.train(was_training)
    return torch.cat(img_out).numpy(), torch.cat(txt_out).numpy()
