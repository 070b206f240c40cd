"""Shared loss input type, the image-id masks, the loss registry and the weighted combination of losses."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from imgtxt.errors import ConfigError

if TYPE_CHECKING:
    from trainer.model import ModelSpec

logger = logging.getLogger(__name__)

# A finite stand-in for -inf in logits that go through softmax and KL terms: exp() underflows to exactly 0,
# yet differences of two such logits stay finite, so 0 * (log p - log q) never turns into NaN. Fits in fp16.
NEG_LARGE = -1.0e4

_OPTIONAL_FIELDS = (
    "text_sim",
    "image_text_sim",
    "image_lexical_sim",
    "image_lexical_max_sim",
    "image_local",
    "text_local",
    "local_sim",
    "unit",
    "image_fragments",
    "text_fragments",
    "text_fragment_mask",
)

FRAGMENT_FIELDS = frozenset({"image_fragments", "text_fragments", "text_fragment_mask"})
"""The optional ``LossInputs`` fields of the towers' local fragments; the trainer fills them only when a loss
``needs`` them (projecting every fragment costs a pass of the heads over every grid cell and token)."""


@dataclass
class LossInputs:
    """One training batch as seen by the losses: embeddings, image ids and optional labels.

    Attributes:
        image: (B, D) L2-normalised image embeddings (the served global vector).
        text: (B, D) L2-normalised caption embeddings; row i is a caption of image ``image_ids[i]``.
        image_ids: (B,) long; rows with equal ids are the same image (several captions of one image can share a
            batch). Pair (i, j) is positive iff ``image_ids[i] == image_ids[j]``; such pairs are never negatives.
        epoch: Current epoch (0-based), for warm-ups.
        text_sim: (B, B) continuous caption–caption similarity labels in [0, 1] (pseudo-labels from a frozen sentence
            encoder), diagonal = 1.
        image_text_sim: (B, B) continuous image–caption relevance labels in [0, 1], indexed [image row, caption
            column]: the mean similarity of caption j's sentence embedding to those of *all* captions of row i's
            image (a pseudo-label of how well caption j describes image i, less noisy than one caption's).
        image_lexical_sim: (B, B) the same orientation and idea with lexical labels: the mean Jaccard similarity of
            caption j's content words to those of each caption of row i's image.
        image_lexical_max_sim: (B, B) the same with the maximum over the image's captions instead of the mean
            (the caption's best lexical match among the image's captions).
        image_local: (B, Dl) local image embeddings (hierarchical option).
        text_local: (B, Dl) local caption embeddings (hierarchical option).
        local_sim: (B, B) lexical local-similarity labels in [0, 1] (e.g. Jaccard of content words between captions).
        unit: (B, D) L2-normalised fused (image, caption) unit embeddings.
        image_fragments: (B, R, D) the local fragments of row i's image (its R grid cells) projected into the
            shared space by the global head, unit norm, without gradient (HREM's fragment-level relations).
        text_fragments: (B, L, D) the same for caption i's tokens (padded to L).
        text_fragment_mask: (B, L) float mask of caption i's valid tokens (1) and padding (0).
    """

    image: Tensor
    text: Tensor
    image_ids: Tensor
    epoch: int = 0
    text_sim: Tensor | None = None
    image_text_sim: Tensor | None = None
    image_lexical_sim: Tensor | None = None
    image_lexical_max_sim: Tensor | None = None
    image_local: Tensor | None = None
    text_local: Tensor | None = None
    local_sim: Tensor | None = None
    unit: Tensor | None = None
    image_fragments: Tensor | None = None
    text_fragments: Tensor | None = None
    text_fragment_mask: Tensor | None = None

    def __post_init__(self) -> None:
        # Shape mistakes here otherwise surface as silent broadcasting deep inside a loss.
        if self.image.dim() != 2 or self.image.shape != self.text.shape:
            raise ValueError(
                f"image and text must both be (B, D); got {tuple(self.image.shape)} and {tuple(self.text.shape)}"
            )
        batch = self.image.shape[0]
        if self.image_ids.shape != (batch,):
            raise ValueError(f"image_ids must be ({batch},); got {tuple(self.image_ids.shape)}")
        for name in ("text_sim", "image_text_sim", "image_lexical_sim", "image_lexical_max_sim", "local_sim"):
            value = getattr(self, name)
            if value is not None and value.shape != (batch, batch):
                raise ValueError(f"{name} must be ({batch}, {batch}); got {tuple(value.shape)}")
        for name in ("image_local", "text_local", "unit"):
            value = getattr(self, name)
            if value is not None and (value.dim() != 2 or value.shape[0] != batch):
                raise ValueError(f"{name} must be ({batch}, D); got {tuple(value.shape)}")
        self._check_fragments(batch)

    def _check_fragments(self, batch: int) -> None:
        """The fragment fields: (B, R, D) and (B, L, D) of one D, the token mask exactly with its fragments."""
        for name in ("image_fragments", "text_fragments"):
            value = getattr(self, name)
            if value is not None and (value.dim() != 3 or value.shape[0] != batch):
                raise ValueError(f"{name} must be ({batch}, K, D); got {tuple(value.shape)}")
        frags, mask = self.text_fragments, self.text_fragment_mask
        if (frags is None) != (mask is None):
            raise ValueError("text_fragments and text_fragment_mask must be given together")
        if frags is not None and mask is not None and mask.shape != frags.shape[:2]:
            raise ValueError(f"text_fragment_mask must be {tuple(frags.shape[:2])}; got {tuple(mask.shape)}")
        if frags is not None and self.image_fragments is not None and frags.shape[2] != self.image_fragments.shape[2]:
            raise ValueError(
                f"image_fragments and text_fragments must share D; got {self.image_fragments.shape[2]} and "
                f"{frags.shape[2]}"
            )

    @property
    def batch_size(self) -> int:
        """Number of (image, caption) rows."""
        return int(self.image.shape[0])

    def positive_mask(self) -> Tensor:
        """(B, B) bool same-image mask (``positive_mask`` of the ids), on the embeddings' device."""
        return positive_mask(self.image_ids.to(self.image.device))

    def require(self, name: str, loss_name: str) -> Tensor:
        """Returns an optional field, or raises a ValueError naming it when it is absent.

        Args:
            name: One of the optional fields (``text_sim``, ``image_text_sim``, ``image_lexical_sim``,
                ``image_local``, ``text_local``, ``local_sim``, ``unit``, the ``FRAGMENT_FIELDS``).
            loss_name: The loss asking, for the error message.
        """
        if name not in _OPTIONAL_FIELDS:
            valid = ", ".join(f.name for f in fields(self))
            raise ValueError(f"unknown LossInputs field {name!r}; valid: {valid}")
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"{loss_name} requires LossInputs.{name}, which is None")
        return value


def positive_mask(image_ids: Tensor) -> Tensor:
    """(B, B) bool mask of positive pairs: True where the two rows show the same image (diagonal included)."""
    return image_ids.unsqueeze(1) == image_ids.unsqueeze(0)


def zero_loss(reference: Tensor) -> Tensor:
    """A scalar 0 on ``reference``'s device and dtype that stays attached to its graph (so backward() works)."""
    return reference.sum() * 0.0


class EmbeddingLoss(nn.Module):
    """Base class of the losses: ``forward(inputs)`` returns named scalar terms.

    Subclasses list their term names in ``term_names`` (used to detect clashes when losses are combined) and may
    set ``term_weights`` (term name -> weight, default 1.0) for the relative weight of their terms inside
    ``total``; the returned terms themselves are always unweighted, so logs show raw values.

    A loss also declares what it needs from the training loop, so the loop asks instead of knowing loss names:
    the optional ``LossInputs`` fields it reads (``requires``), constructor arguments that come from the model
    (``model_kwargs``), and what it does after each optimizer step (``after_step``).
    """

    term_names: ClassVar[tuple[str, ...]] = ()
    """Names of the terms ``forward`` returns."""
    requires: ClassVar[frozenset[str]] = frozenset()
    """Optional ``LossInputs`` fields ``forward`` always reads (``text_sim``, ``local_sim``, ``unit``, ...); the
    trainer builds the labels among them and checks that the model provides the embeddings. A loss whose needs
    depend on its arguments overrides ``needs``."""
    batch: ClassVar[str | None] = None
    """The batch composition the loss needs to work as its paper describes (`caption` for the hinge losses: their
    hardest negatives are other images' captions, which image-major batches dilute with the image's own positives),
    or None when either works; `sampling=auto` follows it."""
    registry_name: ClassVar[str] = ""
    """The name the loss is registered under (``register_loss``)."""

    def __init__(self) -> None:
        super().__init__()
        self.term_weights: dict[str, float] = {}

    def needs(self) -> frozenset[str]:
        """The optional ``LossInputs`` fields this instance reads: ``requires`` unless its arguments add some."""
        return self.requires

    @classmethod
    def model_kwargs(cls, model: ModelSpec) -> dict[str, Any]:
        """Constructor arguments taken from the model being trained (configured ``loss_kwargs`` win); none here."""
        return {}

    def after_step(self) -> None:
        """Called after every optimizer step (e.g. to clamp a parameter back into its range); nothing here."""

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        raise NotImplementedError

    def total(self, terms: Mapping[str, Tensor]) -> Tensor:
        """Sum of this loss's terms, each scaled by its ``term_weights`` entry (default 1)."""
        values = [self.term_weights.get(name, 1.0) * value for name, value in terms.items()]
        return torch.stack(values).sum()


LOSSES: dict[str, type[EmbeddingLoss]] = {}

_L = TypeVar("_L", bound=type[EmbeddingLoss])


def register_loss(name: str) -> Callable[[_L], _L]:
    """Class decorator adding a loss to ``LOSSES`` under ``name``."""

    def decorate(cls: _L) -> _L:
        if name in LOSSES and LOSSES[name] is not cls:
            raise ValueError(f"loss name {name!r} is already registered to {LOSSES[name].__name__}")
        stray = sorted(cls.requires - set(_OPTIONAL_FIELDS))
        if stray:
            raise ValueError(f"{cls.__name__}.requires names no optional LossInputs field: {', '.join(stray)}")
        LOSSES[name] = cls
        cls.registry_name = name
        return cls

    return decorate


def build_loss(name: str, **kwargs: Any) -> EmbeddingLoss:
    """Instantiates the registered loss ``name`` with ``kwargs``.

    Raises:
        ConfigError: (a ValueError) when ``name`` is not registered; the message lists the valid names.
    """
    try:
        cls = LOSSES[name]
    except KeyError:
        raise ConfigError(f"unknown loss {name!r}; valid: {', '.join(sorted(LOSSES))}") from None
    return cls(**kwargs)


class CombinedLoss(nn.Module):
    """Weighted sum of several registered losses.

    ``forward`` returns every loss's named terms unchanged plus ``"loss"``, the total
    ``sum_loss weight[loss] * sum_term term_weight[term] * term``. The losses are sub-modules, so their parameters
    (InfoNCE's temperature, the HREM relation module) are in ``parameters()`` and must be given to the optimizer.

    Args:
        weights: Loss name -> weight of that loss in the total (>= 0).
        loss_kwargs: Loss name -> constructor keyword arguments; every key must also be in ``weights``.
        model: The model being trained; each loss's ``model_kwargs(model)`` are its default constructor arguments.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        loss_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        model: ModelSpec | None = None,
    ) -> None:
        super().__init__()
        if not weights:
            raise ConfigError(f"CombinedLoss needs at least one loss; valid: {', '.join(sorted(LOSSES))}")
        loss_kwargs = dict(loss_kwargs or {})
        stray = sorted(set(loss_kwargs) - set(weights))
        if stray:
            raise ConfigError(f"loss_kwargs given for losses without a weight: {', '.join(stray)}")
        self.weights: dict[str, float] = {}
        self.losses = nn.ModuleDict()
        owner: dict[str, str] = {}
        for name, weight in weights.items():
            if weight < 0:
                raise ConfigError(f"loss weight for {name!r} must be >= 0, got {weight}")
            defaults = LOSSES[name].model_kwargs(model) if name in LOSSES and model is not None else {}
            loss = build_loss(name, **{**defaults, **loss_kwargs.get(name, {})})
            for term in loss.term_names:
                if term == "loss" or term in owner:
                    raise ConfigError(f"term {term!r} of {name!r} clashes with {owner.get(term, 'the total')!r}")
                owner[term] = name
            self.losses[name] = loss
            self.weights[name] = float(weight)

    def needing(self, name: str) -> list[str]:
        """Names of the losses that require the optional ``LossInputs`` field ``name``."""
        return [loss for loss, module in self.losses.items() if name in _requires(module)]

    @property
    def requires(self) -> frozenset[str]:
        """Every optional ``LossInputs`` field some loss requires."""
        return frozenset().union(*(_requires(module) for module in self.losses.values()))

    def after_step(self) -> None:
        """Runs every loss's ``after_step`` hook (nested losses included); call after each optimizer step."""
        for module in self.modules():
            if isinstance(module, EmbeddingLoss):
                module.after_step()

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        parts: list[Tensor] = []
        for name, module in self.losses.items():
            assert isinstance(module, EmbeddingLoss)
            terms = module(inputs)
            out.update(terms)
            parts.append(self.weights[name] * module.total(terms))
        out["loss"] = torch.stack(parts).sum()
        return out


def _requires(module: nn.Module) -> frozenset[str]:
    """What a loss and the losses inside it (e.g. BCLS's two) require."""
    return frozenset().union(*(m.needs() for m in module.modules() if isinstance(m, EmbeddingLoss)))


def needed_sampling(names: Iterable[str]) -> dict[str, str]:
    """Loss name -> the batch composition it declares (`EmbeddingLoss.batch`), for the registered losses that have one.

    Raises:
        ConfigError: An unknown loss name.
    """
    out = {}
    for name in names:
        if name not in LOSSES:
            raise ConfigError(f"unknown loss {name!r}; valid: {', '.join(sorted(LOSSES))}")
        if LOSSES[name].batch is not None:
            out[name] = str(LOSSES[name].batch)
    return out
