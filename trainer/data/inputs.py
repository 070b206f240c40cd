"""Tower inputs from files and captions: decoded pixels through `imgtxt.preprocess`, token ids, one batch's tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from imgtxt.preprocess import ImagePreprocessConfig, decode_image, random_resized_crop, resize_image, to_array
from imgtxt.text import TextTokenizer
from trainer.model import DualEncoder, tokenizer_path


def load_pixels(path: Path, cfg: ImagePreprocessConfig, rng: np.random.Generator | None = None) -> np.ndarray:
    """One image file -> (3, H, W) float32 input: the serving transform, or random resized crop + flip when `rng`."""
    img = decode_image(path.read_bytes(), draft_size=cfg.image_size)
    img = random_resized_crop(img, cfg, rng) if rng is not None else resize_image(img, cfg)
    return to_array(img, cfg)


def tokenize(model: DualEncoder, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Captions -> (input_ids, attention_mask) int64 tensors, padded to the longest caption."""
    batch = _tokenizer(model).encode(list(captions))
    return torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)


_TOKENIZERS: dict[int, TextTokenizer] = {}


def _tokenizer(model: DualEncoder) -> TextTokenizer:
    key = model.spec.max_tokens
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = TextTokenizer.from_file(tokenizer_path(), model.text_config)
    return _TOKENIZERS[key]


@dataclass
class TowerInputs:
    """Inputs of the trainable part of both towers for one batch."""

    image: Tensor
    """Image activations at the image split point (pixels when the split is 0)."""
    text: Tensor
    """(B, L, H) text hidden states at the text split point."""
    text_mask: Tensor
    """(B, L) attention mask."""

    def to(self, device: torch.device) -> TowerInputs:
        """Moves every tensor (non-blocking) and restores float32 for cached fp16 activations."""
        return TowerInputs(
            self.image.to(device, non_blocking=True).float(),
            self.text.to(device, non_blocking=True).float(),
            self.text_mask.to(device, non_blocking=True),
        )
