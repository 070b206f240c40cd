"""The fp16 graph variant: half-precision weights and compute behind a float32 interface, loosely parity-gated."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from torch import Tensor, nn

from imgtxt.bundle import Parity
from trainer.onnx_export import export_onnx

MIN_COSINE_FP16 = 0.99
"""The (looser) parity bound of the fp16 graphs."""


class HalfPrecision(nn.Module):
    """Runs a module in half precision behind float32 inputs and outputs (the fp16 graph variant)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.half()

    def forward(self, *args: Tensor) -> Tensor:
        cast = [a.half() if a.is_floating_point() else a for a in args]
        return self.module(*cast).float()


def export_fp16(
    module: nn.Module,
    feeds: dict[str, np.ndarray],
    path: Path,
    dynamic: dict[str, dict[int, str]],
    meta: dict[str, str],
) -> Parity:
    """Exports the fp16 variant of `module` (a copy: `module` stays float32) and returns its parity.

    Its parity against the float32 torch module is measured and recorded (manifest `serving.precisions.fp16`) and gated
    loosely (cosine >= MIN_COSINE_FP16): half precision cannot meet the float32 bound, but a broken graph fails.
    """
    half = HalfPrecision(copy.deepcopy(module))
    return export_onnx(half, feeds, path, dynamic, meta, reference=module, min_cosine=MIN_COSINE_FP16).parity
