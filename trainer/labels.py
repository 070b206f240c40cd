"""Pairwise labels of a batch's captions, built for the losses that declare them (`EmbeddingLoss.needs`).

The losses' optional inputs come from two places: the model (the unit head's `unit`, the hierarchical option's
`image_local` / `text_local`) and the data (`text_sim`: frozen sentence-embedding similarities stored in the feature
cache; `image_text_sim`: the same embeddings averaged over each image's captions; `local_sim`: lexical similarities of
the captions; `image_lexical_sim`: those averaged over each image's captions; `image_lexical_max_sim`: their
maximum). The trainer asks the combined loss
what it requires, checks here that the model and the data can provide it, and builds only those labels for each
gathered batch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from imgtxt.errors import ConfigError
from trainer.data.captions import CaptionTable
from trainer.losses import CombinedLoss, lexical_similarity
from trainer.model import ModelSpec


def check_model_provides(loss: CombinedLoss, model: ModelSpec) -> None:
    """Raises a ConfigError naming the losses that require embeddings `model` does not produce."""
    provided = {"unit": model.with_unit, "image_local": bool(model.local_dim), "text_local": bool(model.local_dim)}
    setting = {"unit": "with_unit=true", "image_local": "local_dim > 0", "text_local": "local_dim > 0"}
    for name, ok in provided.items():
        if not ok and loss.needing(name):
            raise ConfigError(f"losses {sorted(loss.needing(name))} need LossInputs.{name}: set {setting[name]}")


class PairLabels:
    """Builds the (B, B) caption-pair labels the losses require, for the rows of a gathered batch.

    Args:
        loss: The combined loss; its `requires` decides which labels are built.
        table: The split's captions (rows index them) with the image of each.
        sentence: (n_captions, H) unit-norm frozen sentence embeddings of the feature cache, or None without one.

    Raises:
        ConfigError: A loss needs `text_sim` or `image_text_sim` but there is no feature cache.
    """

    def __init__(self, loss: CombinedLoss, table: CaptionTable, sentence: Tensor | None) -> None:
        self.table, self.sentence = table, sentence
        self.captions, self.caption_image = table.captions, table.caption_image
        builders: dict[str, Callable[[np.ndarray], Tensor]] = {
            "text_sim": self._text_similarity,
            "image_text_sim": self._image_text_similarity,
            "local_sim": self._lexical_similarity,
            "image_lexical_sim": self._image_lexical_similarity,
            "image_lexical_max_sim": self._image_lexical_max_similarity,
        }
        self.builders = {name: build for name, build in builders.items() if name in loss.requires}
        for name in ("text_sim", "image_text_sim"):
            if name in self.builders and sentence is None:
                raise ConfigError(
                    f"losses {sorted(loss.needing(name))} need the caption pseudo-labels stored in the feature "
                    "cache: set cache_features=true"
                )
        self.image_mean: Tensor | None = None
        if "image_text_sim" in self.builders and sentence is not None:
            # Mean of each image's caption embeddings: mean_k cos(s_ik, s_j) = image_mean_i . s_j.
            owner = torch.from_numpy(np.asarray(self.caption_image, dtype=np.int64))
            n_images = int(owner.max()) + 1 if owner.numel() else 0
            total = torch.zeros(n_images, sentence.shape[1]).index_add_(0, owner, sentence.float())
            self.image_mean = total / torch.bincount(owner, minlength=n_images).clamp(min=1).unsqueeze(1)

    def __call__(self, rows: np.ndarray, device: torch.device) -> dict[str, Tensor]:
        """The required labels of caption rows `rows` (in batch order), on `device`."""
        return {name: build(rows).to(device) for name, build in self.builders.items()}

    def _text_similarity(self, rows: np.ndarray) -> Tensor:
        assert self.sentence is not None
        s = self.sentence[rows].float()
        return (s @ s.T).clamp(0, 1)

    def _image_text_similarity(self, rows: np.ndarray) -> Tensor:
        assert self.sentence is not None and self.image_mean is not None
        images = torch.from_numpy(np.asarray(self.caption_image[rows], dtype=np.int64))
        return (self.image_mean[images] @ self.sentence[rows].float().T).clamp(0, 1)

    def _lexical_similarity(self, rows: np.ndarray) -> Tensor:
        captions = [self.captions[i] for i in rows]
        return torch.from_numpy(lexical_similarity(captions, captions))

    def _image_lexical_similarity(self, rows: np.ndarray) -> Tensor:
        sim, offsets, counts = self._image_lexical_runs(rows)
        return torch.from_numpy(np.add.reduceat(sim, offsets, axis=0) / counts[:, None].astype(np.float32))

    def _image_lexical_max_similarity(self, rows: np.ndarray) -> Tensor:
        sim, offsets, _ = self._image_lexical_runs(rows)
        return torch.from_numpy(np.maximum.reduceat(sim, offsets, axis=0))

    def _image_lexical_runs(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every caption of each row's image against the batch's captions (lexical similarity), with the start and
        length of each image's run of rows, for a mean or maximum over each run."""
        images = self.caption_image[rows]
        starts, ends = self.table.caption_spans(images)
        counts = ends - starts
        owned = self.table.captions_of(images)
        sim = lexical_similarity([self.captions[k] for k in owned], [self.captions[k] for k in rows])
        return sim, np.concatenate([[0], np.cumsum(counts)[:-1]]), counts
