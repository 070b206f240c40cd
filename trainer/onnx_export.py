"""ONNX export of one module: TorchScript exporter, `onnx.checker`, metadata, then torch-vs-ONNX Runtime parity.

The one path for every graph the trainer writes: the bundle's towers (`trainer.export`) and the frozen image stages
that the feature cache runs through ONNX Runtime (`trainer.data.cache`).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from imgtxt.bundle import Parity
from imgtxt.errors import BundleError

logger = logging.getLogger(__name__)

OPSET = 17
MIN_COSINE = 0.9999
"""Parity gate: an export fails when any torch-vs-ONNX output row has a lower cosine similarity than this."""


@dataclass(frozen=True)
class ExportedGraph:
    """One exported graph with its parity figures."""

    path: Path
    """The ONNX file written."""
    parity: Parity
    """torch vs onnxruntime agreement on the export's inputs."""
    session: ort.InferenceSession = field(repr=False, compare=False)
    """The ONNX Runtime CPU session parity was measured with (it holds the graph in memory)."""


def cpu_session(path: Path) -> ort.InferenceSession:
    """An ONNX Runtime session of `path` on the CPU execution provider."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def measure_parity(
    module: nn.Module, session: ort.InferenceSession, feeds: dict[str, np.ndarray], output: str = "embedding"
) -> Parity:
    """Runs the torch module and the ONNX session on the same inputs and compares the outputs row by row (each row
    flattened)."""
    with torch.no_grad():
        expected = module(*(torch.from_numpy(v) for v in feeds.values())).float().numpy()
    (actual,) = session.run([output], feeds)
    expected = expected.reshape(len(expected), -1)
    actual = actual.astype(np.float32).reshape(len(actual), -1)
    cos = (expected * actual).sum(1) / (np.linalg.norm(expected, axis=1) * np.linalg.norm(actual, axis=1) + 1e-12)
    return Parity(
        max_abs_diff=float(np.abs(expected - actual).max()), min_cosine=float(cos.min()), num_inputs=len(expected)
    )


def export_onnx(
    module: nn.Module,
    feeds: dict[str, np.ndarray],
    path: Path,
    dynamic: dict[str, dict[int, str]],
    metadata: dict[str, str],
    opset: int = OPSET,
    reference: nn.Module | None = None,
    min_cosine: float = MIN_COSINE,
    output: str = "embedding",
) -> ExportedGraph:
    """Exports one module: TorchScript-based ONNX export, `onnx.checker`, metadata, then parity on `feeds`.

    Args:
        module: The module; its inputs are the values of `feeds`, in order, named by their keys.
        feeds: Input name -> array, for tracing and for the parity check.
        path: The ONNX file to write.
        dynamic: Input name -> {axis: name} of the dynamic axes (the output's batch axis is always dynamic).
        metadata: `metadata_props` written into the graph.
        opset: ONNX opset.
        reference: Module the graph's outputs are compared with (default `module` itself; the float32 tower when
            `module` is its fp16 variant).
        min_cosine: Parity gate.
        output: Name of the graph's output.

    Raises:
        BundleError: The graph's outputs disagree with torch (min cosine < `min_cosine`).
    """
    module = module.eval()
    args = tuple(torch.from_numpy(v) for v in feeds.values())
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter announces its own retirement and narrates tracing; parity below is the real check.
        for category in (DeprecationWarning, UserWarning, torch.jit.TracerWarning):
            warnings.simplefilter("ignore", category)
        # The TorchScript exporter: the dynamo one is slower and still trips over HF attention code on this torch.
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(feeds),
            output_names=[output],
            dynamic_axes={**dynamic, output: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    for key, value in metadata.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(model, str(path))
    session = cpu_session(path)
    parity = measure_parity(reference or module, session, feeds, output)
    logger.info("exported %s", path.name, extra={"max_abs_diff": parity.max_abs_diff, "min_cosine": parity.min_cosine})
    if not parity.min_cosine >= min_cosine:  # also catches NaN
        raise BundleError(
            f"{path.name}: ONNX output disagrees with torch (min cosine {parity.min_cosine:.6f} < {min_cosine}, "
            f"max |diff| {parity.max_abs_diff:.3g})"
        )
    return ExportedGraph(path, parity, session)
