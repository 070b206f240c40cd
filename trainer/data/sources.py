"""Sources: image and caption indices -> inputs of the trainable part of the towers, from pixels or from the cache.

`PixelSource` runs the frozen lower stages on the fly from decoded, optionally augmented pixels; `CachedSource`
serves activations cached once from them (`trainer.data.cache`). Both use the same `imgtxt.preprocess` functions
as serving.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from imgtxt.preprocess import ImagePreprocessConfig
from trainer.data.cache import FeatureStore
from trainer.data.captions import CaptionTable
from trainer.data.inputs import TowerInputs, load_pixels, tokenize
from trainer.model import DualEncoder


class Source(Protocol):
    """Anything that yields the trainable towers' inputs for image and caption indices."""

    def images(self, image_idx: np.ndarray, augment: bool = False, mirror: bool = False) -> Tensor: ...

    def texts(self, caption_idx: np.ndarray) -> tuple[Tensor, Tensor]: ...

    def batch(self, image_idx: np.ndarray, caption_idx: np.ndarray, augment: bool = False) -> TowerInputs: ...


class PixelSource:
    """Runs the frozen lower stages on the fly from image files and captions (with augmentation when training)."""

    def __init__(
        self,
        model: DualEncoder,
        table: CaptionTable,
        image_split: int,
        text_split: int,
        seed: int = 0,
        preprocess: ImagePreprocessConfig | None = None,
    ):
        """`preprocess`: the image transform (default: the model's serving contract)."""
        self.model, self.table = model, table
        self.image_split, self.text_split = image_split, text_split
        self.rng = np.random.default_rng(seed)
        self.preprocess = preprocess or model.image_preprocess

    def images(self, image_idx: np.ndarray, augment: bool = False, mirror: bool = False) -> Tensor:
        """Image activations at the split point (frozen stages run without gradients); `mirror`: of the mirrored
        evaluation view (flip-averaged validation)."""
        cfg = self.preprocess
        rng = self.rng if augment else None
        pixels = torch.from_numpy(np.stack([load_pixels(self.table.images[i].path, cfg, rng) for i in image_idx]))
        if mirror:
            pixels = pixels.flip(-1)
        with torch.no_grad():
            return self.model.image.features(pixels.to(self._device()), self.image_split)

    def texts(self, caption_idx: np.ndarray) -> tuple[Tensor, Tensor]:
        """Caption hidden states at the split point and their mask."""
        ids, mask = tokenize(self.model, [self.table.captions[c] for c in caption_idx])
        ids, mask = ids.to(self._device()), mask.to(self._device())
        with torch.no_grad():
            return self.model.text.features(ids, mask, self.text_split), mask

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def batch(self, image_idx: np.ndarray, caption_idx: np.ndarray, augment: bool = False) -> TowerInputs:
        """Inputs for the given images and captions."""
        return TowerInputs(self.images(image_idx, augment), *self.texts(caption_idx))


class CachedSource:
    """Serves batches from a `FeatureStore`; with augmented views cached, `augment` picks one view per image."""

    def __init__(self, store: FeatureStore, seed: int = 0) -> None:
        self.store = store
        self.rng = np.random.default_rng(seed)

    def images(self, image_idx: np.ndarray, augment: bool = False, mirror: bool = False) -> Tensor:
        """Cached image activations: the evaluation view, (augment) a random one of the cached views each, or
        (mirror) the mirrored evaluation view."""
        if mirror:
            if self.store.image_mirror is None:
                raise ValueError("this feature cache holds no mirrored view (built without mirror=True)")
            return self.store.image_mirror[image_idx]
        views = self.store.image_views
        if not augment or views is None:
            return self.store.image[image_idx]
        pick = self.rng.integers(0, len(views) + 1, size=len(image_idx))  # 0: evaluation view, v: views[v - 1]
        out = self.store.image[image_idx].clone()
        for v in range(1, len(views) + 1):
            rows = np.nonzero(pick == v)[0]
            if len(rows):
                out[rows] = views[v - 1][image_idx[rows]]
        return out

    def texts(self, caption_idx: np.ndarray) -> tuple[Tensor, Tensor]:
        """Cached hidden states, trimmed to the batch's longest caption, and their mask."""
        mask = self.store.text_mask[caption_idx]
        length = int(mask.sum(1).max())
        return self.store.text[caption_idx, :length], mask[:, :length]

    def batch(self, image_idx: np.ndarray, caption_idx: np.ndarray, augment: bool = False) -> TowerInputs:
        """Inputs for the given images and captions."""
        return TowerInputs(self.images(image_idx, augment), *self.texts(caption_idx))
