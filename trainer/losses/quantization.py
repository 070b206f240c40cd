"""Quantisation-aware loss and torch helpers that simulate Qdrant int8 scalar and binary quantisation."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from imgtxt.errors import ConfigError
from trainer.losses.base import EmbeddingLoss, LossInputs, register_loss
from trainer.losses.info_nce import multi_positive_cross_entropy
from trainer.losses.triplet import vsepp_hinge

QuantMode = Literal["int8", "binary"]
_MODES = ("int8", "binary")
Retrieval = Literal["infonce", "triplet"]
_RETRIEVALS = ("infonce", "triplet")

INT8_LEVELS = 255  # 256 codes, 255 steps between the range ends


def _quantile(values: Tensor, q: float, dim: int | None) -> Tensor:
    # kthvalue instead of torch.quantile: the latter refuses inputs over 2^24 elements (a whole collection).
    flat = values.flatten() if dim is None else values
    axis = 0 if dim is None else dim
    n = flat.shape[axis]
    k = min(n, max(1, round(q * (n - 1)) + 1))
    return flat.kthvalue(k, dim=axis).values


def int8_bounds(
    x: Tensor, quantile: float = 0.99, per_dimension: bool = False, symmetric: bool = False
) -> tuple[Tensor, Tensor]:
    """Range [lo, hi] of int8 scalar quantisation, calibrated on ``x`` the way Qdrant calibrates on a collection.

    Qdrant's ``quantile`` keeps the central ``quantile`` mass of all vector components: the range is the
    ``(1 - q) / 2`` and ``(1 + q) / 2`` quantiles of the values (one range for the whole collection), and outliers are
    clipped. ``per_dimension`` computes one range per column instead; ``symmetric`` uses ``[-b, b]`` with ``b`` the
    ``quantile`` quantile of ``|x|``. Both are variants Qdrant does not use, kept for experiments.

    Args:
        x: (N, D) calibration vectors.
        quantile: Central mass kept, in (0, 1].
        per_dimension: One range per dimension (shapes (D,)) instead of one scalar range.
        symmetric: Zero-centred range.

    Returns:
        (lo, hi), detached, scalars or (D,).
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    values = x.detach()
    dim = 0 if per_dimension else None
    if symmetric:
        hi = _quantile(values.abs(), quantile, dim)
        return -hi, hi
    return _quantile(values, (1.0 - quantile) / 2, dim), _quantile(values, (1.0 + quantile) / 2, dim)


def quantize_int8(
    x: Tensor,
    quantile: float = 0.99,
    per_dimension: bool = False,
    symmetric: bool = False,
    bounds: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Int8 scalar quantise-dequantise ``x`` with a straight-through gradient.

    ``code = round((clip(x, lo, hi) - lo) / step)`` in 0..255 with ``step = (hi - lo) / 255``, returned as
    ``code * step + lo``. Forward: the dequantised value Qdrant scores with. Backward: the straight-through estimator
    (Bengio et al. 2013, "Estimating or Propagating Gradients Through Stochastic Neurons"): identity inside the
    range, zero for clipped components.

    Args:
        x: (N, D) vectors.
        quantile: See ``int8_bounds`` (ignored when ``bounds`` is given).
        per_dimension: See ``int8_bounds``.
        symmetric: See ``int8_bounds``.
        bounds: Precomputed (lo, hi), e.g. calibrated on the indexed collection and reused for the queries.

    Returns:
        Dequantised (N, D), same dtype and device as ``x``.
    """
    lo, hi = bounds if bounds is not None else int8_bounds(x, quantile, per_dimension, symmetric)
    lo = lo.to(x.dtype)
    hi = hi.to(x.dtype)
    step = ((hi - lo) / INT8_LEVELS).clamp(min=torch.finfo(x.dtype).tiny)
    clipped = torch.maximum(torch.minimum(x, hi), lo)
    dequantised = torch.round((clipped - lo) / step) * step + lo
    return clipped + (dequantised - clipped).detach()


def binarize(x: Tensor) -> Tensor:
    """Qdrant binary quantisation: +1 where a component is > 0, else -1 (bit 1 / bit 0), in ``x``'s dtype.

    The dot product of two such vectors is ``D - 2 * hamming``, so ranking by it equals ranking by Hamming distance.
    No gradient (use ``binarize_st`` in training).
    """
    return torch.where(x > 0, torch.ones_like(x), -torch.ones_like(x))


def binarize_st(x: Tensor, beta: float = 1.0) -> Tensor:
    """``binarize`` in the forward pass, gradient of ``tanh(beta * sqrt(D) * x)`` in the backward pass.

    The sqrt(D) rescaling makes the relaxation independent of the dimension: components of a unit vector are
    O(1 / sqrt(D)), so without it tanh would stay in its linear regime. A larger beta sharpens the relaxation.
    """
    soft = torch.tanh(beta * math.sqrt(x.shape[-1]) * x)
    return soft + (binarize(x) - soft).detach()


@register_loss("quantization")
class QuantizationLoss(EmbeddingLoss):
    """Quantisation-aware training so that retrieval survives Qdrant int8 or binary quantisation.

    The image and caption vectors are quantised in the forward pass (``int8``: ``quantize_int8`` with one range
    calibrated on the batch's image and caption components together; ``binary``: ``binarize_st``, scaled by
    1/sqrt(D) to unit norm) and a retrieval loss is computed on the quantised vectors, with straight-through
    gradients to the float embeddings ("Learning to embed semantic similarity"; quantisation-aware training as in
    Jacob et al. 2018; the quantisation penalty as in deep hashing, e.g. Li et al. 2016, DPSH).

    ``quant_retrieval``: multi-positive symmetric InfoNCE at a fixed ``temperature`` (or a VSE++ hardest-negative
    hinge with ``retrieval="triplet"``) on the quantised similarities; same-image pairs are never negatives.
    ``quant_error``: ``mean ||x - q(x)||^2`` over image and caption rows with ``q(x)`` detached, pulling the
    components towards the quantisation grid (int8) or towards ``+-1/sqrt(D)`` (binary).

    Args:
        mode: ``int8`` or ``binary``.
        quantile: Int8 calibration quantile (Qdrant's ``quantile``).
        per_dimension: Int8 range per dimension instead of Qdrant's single range.
        beta: Sharpness of the binary tanh relaxation.
        retrieval: ``infonce`` or ``triplet``.
        temperature: InfoNCE temperature (fixed; the learnable one lives in ``InfoNCELoss``).
        margin: Hinge margin for ``retrieval="triplet"``.
        error_weight: Weight of ``quant_error`` relative to ``quant_retrieval`` in ``total``.
    """

    term_names = ("quant_retrieval", "quant_error")

    def __init__(
        self,
        mode: QuantMode = "int8",
        quantile: float = 0.99,
        per_dimension: bool = False,
        beta: float = 1.0,
        retrieval: Retrieval = "infonce",
        temperature: float = 0.05,
        margin: float = 0.2,
        error_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ConfigError(f"unknown quantisation mode {mode!r}; valid: {', '.join(_MODES)}")
        if retrieval not in _RETRIEVALS:
            raise ConfigError(f"unknown retrieval loss {retrieval!r}; valid: {', '.join(_RETRIEVALS)}")
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.mode: QuantMode = mode
        self.quantile = quantile
        self.per_dimension = per_dimension
        self.beta = beta
        self.retrieval: Retrieval = retrieval
        self.temperature = temperature
        self.margin = margin
        self.term_weights = {"quant_error": error_weight}

    def quantize(self, x: Tensor, bounds: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Quantised (straight-through) version of ``x`` in this loss's mode."""
        if self.mode == "binary":
            return binarize_st(x, self.beta) / math.sqrt(x.shape[-1])
        return quantize_int8(x, self.quantile, self.per_dimension, bounds=bounds)

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        both = torch.cat([inputs.image, inputs.text], dim=0)
        bounds = None
        if self.mode == "int8":
            bounds = int8_bounds(both, self.quantile, self.per_dimension)
        quantised = self.quantize(both, bounds)
        batch = inputs.batch_size
        q_image, q_text = quantised[:batch], quantised[batch:]
        pos = inputs.positive_mask()
        scores = q_image @ q_text.T
        if self.retrieval == "infonce":
            logits = scores / self.temperature
            retrieval = 0.5 * (
                multi_positive_cross_entropy(logits, pos) + multi_positive_cross_entropy(logits.T, pos.T)
            )
        else:
            retrieval = vsepp_hinge(scores, pos, self.margin, max_violation=True)
        error = (both - quantised.detach()).pow(2).sum(dim=1).mean()
        return {"quant_retrieval": retrieval, "quant_error": error}
