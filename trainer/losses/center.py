"""Centre losses: in-batch centres of each image id (`center`), or learned concept centres (`concept_center`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.losses.base import EmbeddingLoss, LossInputs, register_loss

if TYPE_CHECKING:
    from trainer.model import ModelSpec


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


@register_loss("concept_center")
class ConceptCenterLoss(EmbeddingLoss):
    """Centre loss on learned concept centres (Wen et al. 2016's learned centres, with concepts for classes).

    ``num_concepts`` centres are parameters of the loss, trained by the optimizer with the heads. Each (image,
    caption) row belongs to the concept whose centre is nearest to the pair's mean direction (assignment without
    gradient, re-made every step as the centres and the embeddings move), and both embeddings are pulled to that
    centre: ``mean over rows of (||v - c||² + ||t - c||²) / 2`` with ``c`` the unit-norm centre. Unlike the in-batch
    centre loss (``center``), whose centres are the batch means and which with one caption per image reduces to
    an alignment term, these centres persist across batches, so a row is drawn towards what its concept's other
    images and captions (of earlier batches) look like, and away from the other concepts' centres. The centres
    themselves learn from the same term (they move to their rows' mean).

    Args:
        dim: Embedding size (from the model).
        num_concepts: Number of learned centres.
    """

    term_names = ("concept_center",)

    @classmethod
    def model_kwargs(cls, model: ModelSpec) -> dict[str, Any]:
        """The centres live in the served embedding space: ``dim`` is the model's."""
        return {"dim": model.dim}

    def __init__(self, dim: int = 512, num_concepts: int = 64) -> None:
        super().__init__()
        if num_concepts < 1:
            raise ValueError(f"num_concepts must be >= 1, got {num_concepts}")
        generator = torch.Generator().manual_seed(0)  # the same centres for every arm of a paired seed
        self.centres = nn.Parameter(F.normalize(torch.randn(num_concepts, dim, generator=generator), dim=-1))

    def assign(self, image: Tensor, text: Tensor) -> Tensor:
        """(B,) index of each row's concept: the centre nearest to the pair's mean direction."""
        with torch.no_grad():
            middle = F.normalize(image + text, dim=-1)
            return (middle @ F.normalize(self.centres, dim=-1).T).argmax(dim=1)

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        centres = F.normalize(self.centres, dim=-1)[self.assign(inputs.image, inputs.text)]
        spread = (inputs.image - centres).pow(2).sum(1) + (inputs.text - centres).pow(2).sum(1)
        return {"concept_center": spread.mean() / 2}
