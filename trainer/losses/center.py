"""In-batch centre loss: image and caption embeddings of one image id are pulled towards their common centre."""

from __future__ import annotations

import torch
from torch import Tensor

from trainer.losses.base import EmbeddingLoss, LossInputs, register_loss


def id_centres(embeddings: Tensor, ids: Tensor) -> Tensor:
    """Per-row centre: the mean of all rows of ``embeddings`` that share the row's id.

    Args:
        embeddings: (N, D).
        ids: (N,) integer ids.

    Returns:
        (N, D), row n = mean of ``embeddings[ids == ids[n]]``.
    """
    unique, inverse = torch.unique(ids.to(embeddings.device), return_inverse=True)
    num = unique.shape[0]
    sums = embeddings.new_zeros(num, embeddings.shape[1]).index_add(0, inverse, embeddings)
    counts = embeddings.new_zeros(num).index_add(0, inverse, torch.ones_like(inverse, dtype=embeddings.dtype))
    return (sums / counts.unsqueeze(1))[inverse]


@register_loss("center")
class CenterLoss(EmbeddingLoss):
    """Intra-class compactness across modalities, after the centre loss of Wen et al. 2016 ("A Discriminative
    Feature Learning Approach for Deep Face Recognition").

    The class is the image id. Its centre ``c_k`` is the mean of all embeddings of id k in the batch, image and
    caption rows together (so a duplicated image counts once per row). The loss is
    ``mean over the 2B embeddings x of ||x - c_id(x)||^2``. Unlike Wen et al., the centres are recomputed from the
    batch instead of being learned, so there is no centre learning rate; the gradient is the same whether or not
    the centre is detached, because the deviations from a mean sum to zero. With one caption per image it reduces
    to ``||v - t||^2 / 4``, a plain alignment term; it has no negatives (pair it with a contrastive loss).
    """

    term_names = ("center",)

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        embeddings = torch.cat([inputs.image, inputs.text], dim=0)
        ids = inputs.image_ids.repeat(2)
        centres = id_centres(embeddings, ids)
        return {"center": (embeddings - centres).pow(2).sum(dim=1).mean()}
