"""The int8 graph variants, made with ONNX Runtime's quantisation tools from the exported fp32 graphs.

- Text tower: **dynamic** quantisation (int8 MatMul weights per output channel; activations quantised per batch at
  run time). Transformers' activation ranges vary with the input, and dynamic quantisation is what
  sentence-transformers ships for them.
- Image tower: **static** quantisation, QDQ format, per-channel int8 weights and uint8 activations whose ranges are
  calibrated on training images (the serving preprocessing of real photos, never the evaluation split), except the
  nodes that carry the loss (`float_nodes`): the stem convolution, which sees the raw normalised pixels, the first
  block after it (its depthwise and projection convolutions, at the stem's full resolution), and everything after the
  backbone's last convolution (pooling, projection head, L2 normalisation). Measured with
  `benchmarks/int8_serving.py --variants` (Flickr8k val, 128 calibration images; figures in
  `benchmarks/results/int8_serving_{quick,default}.md`) and `--precision` checks at export:
  - quick recipe (EfficientNet-Lite0, frozen): every node int8 lost 0.68 rSum, the head alone in float 1.12; the
    stem in float gained 0.64, the stem and the head 0.20, the stem, first block and head lost 0.06 (all noise);
  - default recipe (EfficientNet-Lite2, top 8 stages fine-tuned): every node int8 +0.22, the head alone in float
    0.00, but the stem in float (alone or with the head) lost 5.0 rSum, and keeping the fine-tuned top stages in
    float as well did not help (ad-hoc runs: stages 15-22 -6.1, 19-22 -5.4), nor did 512 calibration images (-7.4),
    7-bit weights (-11.7) or uint8 weights (-5.2). Keeping the first block in float too recovered it (+0.60, 2.2x
    fp32 at batch 1 and 32). Presumably a float stem leaves its output to be quantised ahead of the first block's
    depthwise convolution with one uint8 range per tensor at full resolution, where quantising the stem too lets
    ONNX Runtime fuse its activation; with the first block in float that tensor is never quantised.
  The stem + first block + head recipe is the only one measured within 0.5 rSum on both recipes.

Each variant's parity against the float32 torch tower is measured on the export's parity inputs, recorded in the
manifest (`serving.precisions.int8`) and gated loosely (cosine >= MIN_COSINE_INT8). Its retrieval cost is measured on
the val split by `measure_retrieval` (each tower at int8 with the other at fp32, against both at fp32, through the
serving path) and recorded beside it (`GraphVariant.retrieval`): `--precision auto` serves int8 on CPU only where that
loss is at most 0.5 rSum. `benchmarks/int8_serving.py` adds the speed.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)
from torch import nn

from imgtxt.bundle import Parity, RetrievalCheck
from imgtxt.datasets import CaptionedImage
from imgtxt.errors import BundleError
from imgtxt.retrieval_metrics import retrieval_metrics
from trainer.onnx_export import cpu_session, measure_parity

logger = logging.getLogger(__name__)

MIN_COSINE_INT8 = 0.9
"""Parity bound of the int8 graphs: a broken quantisation fails; the retrieval cost is measured on val."""


class _Batches(CalibrationDataReader):
    """Feeds calibration batches of pixel arrays to ONNX Runtime's calibrator."""

    def __init__(self, name: str, pixels: np.ndarray, batch: int = 16) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            {name: pixels[i : i + batch]} for i in range(0, len(pixels), batch)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


FLOAT_PARTS = ("stem", "first_block", "head")
"""Parts of the image tower its static quantisation keeps in float (see the module docstring)."""


def float_nodes(model: onnx.ModelProto, parts: Sequence[str] = FLOAT_PARTS) -> list[str]:
    """Nodes of an image tower to keep in float: `stem`, the convolutions fed by the graph's input; `first_block`, the
    convolutions after the stem up to and including the first ungrouped (pointwise or full) one, i.e. the first
    block's depthwise and projection convolutions; `head`, every node after the last convolution (pooling, projection
    head, normalisation)."""
    unknown = sorted(set(parts) - set(FLOAT_PARTS))
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; known: {', '.join(FLOAT_PARTS)}")
    nodes = list(model.graph.node)
    convs = [k for k, n in enumerate(nodes) if n.op_type == "Conv"]
    if not convs:
        return []
    # The stem reads the pixels directly or through ops on them alone (e.g. static padding).
    fed = {i.name for i in model.graph.input}
    for n in nodes[: convs[0]]:
        if set(n.input) & fed:
            fed |= set(n.output)
    stem = [k for k in convs if set(nodes[k].input) & fed]
    out: list[str] = [nodes[k].name for k in stem] if "stem" in parts else []
    if "first_block" in parts and stem:
        for k in convs[convs.index(stem[-1]) + 1 :]:
            out.append(nodes[k].name)
            if _group(nodes[k]) == 1:
                break
    return out + ([n.name for n in nodes[convs[-1] + 1 :]] if "head" in parts else [])


def _group(node: onnx.NodeProto) -> int:
    """A convolution's `group` attribute (1 when absent)."""
    return next((int(a.i) for a in node.attribute if a.name == "group"), 1)


@contextlib.contextmanager
def _prepared(fp32_path: Path) -> Iterator[Path]:
    """The graph after ONNX Runtime's quantisation pre-processing (shape inference + folding), in a temporary file."""
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        yield prepared


def quantize_image_static(
    fp32_path: Path,
    out_path: Path,
    calibration: np.ndarray,
    input_name: str = "pixel_values",
    parts: Sequence[str] = FLOAT_PARTS,
    method: str = "MinMax",
) -> None:
    """Statically quantises an image tower: QDQ, per-channel int8 weights, uint8 activations calibrated on
    `calibration`, the `parts` (`float_nodes`) left in float.

    Args:
        fp32_path: The float32 graph.
        out_path: Where the int8 graph goes.
        calibration: (N, 3, H, W) preprocessed training images.
        input_name: The graph's pixel input.
        parts: Parts kept in float (`float_nodes`: `stem`, `first_block`, `head`).
        method: Calibration: `MinMax`, `Entropy` or `Percentile` (ONNX Runtime's `CalibrationMethod`).
    """
    with _prepared(fp32_path) as prepared:
        quantize_static(
            prepared,
            out_path,
            _Batches(input_name, calibration.astype(np.float32)),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            calibrate_method=getattr(CalibrationMethod, method),
            nodes_to_exclude=float_nodes(onnx.load(str(prepared)), parts),
        )


def export_int8(
    fp32_path: Path,
    out_path: Path,
    modality: str,
    module: nn.Module,
    parity_feeds: dict[str, np.ndarray],
    calibration: np.ndarray | None = None,
) -> Parity:
    """Writes the int8 variant of an exported fp32 graph and returns its parity against the torch module.

    Args:
        fp32_path: The exported float32 graph.
        out_path: Where the int8 graph goes.
        modality: `image` (static, calibrated) or `text` (dynamic).
        module: The float32 torch tower (the parity reference).
        parity_feeds: The export's parity inputs.
        calibration: Image tower only: (N, 3, H, W) preprocessed training images.

    Raises:
        BundleError: The variant fails the parity bound, or the image tower has no calibration images.
    """
    if modality not in ("image", "text"):
        raise BundleError(f"no int8 variant for the {modality} graph")
    if modality == "image" and (calibration is None or not len(calibration)):
        raise BundleError("the int8 image tower needs calibration images (training images, preprocessed)")
    if modality == "image":
        assert calibration is not None
        (input_name,) = parity_feeds
        quantize_image_static(fp32_path, out_path, calibration, input_name)
    else:
        with _prepared(fp32_path) as prepared:
            # MatMul weights only, per output channel, 7-bit range: on all-MiniLM-L6-v2 (Flickr8k val) this kept rSum
            # within 1.2 of fp32 where the defaults (every op, per tensor) lost 5.8, at the same speed.
            quantize_dynamic(
                prepared,
                out_path,
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=True,
                op_types_to_quantize=["MatMul"],
            )
    parity = measure_parity(module, cpu_session(out_path), parity_feeds)
    if parity.min_cosine < MIN_COSINE_INT8:
        raise BundleError(
            f"int8 {modality} graph fails parity: min cosine {parity.min_cosine:.4f} < {MIN_COSINE_INT8} "
            f"(max |d| {parity.max_abs_diff:.3e})"
        )
    logger.info("int8 variant", extra={"modality": modality, "min_cosine": parity.min_cosine})
    return parity


def calibration_pixels(paths: Sequence[Path], preprocess: object) -> np.ndarray:
    """(N, 3, H, W) float32: training images through the serving preprocessing (the calibration set)."""
    from imgtxt.preprocess import preprocess_image

    return np.stack([preprocess_image(p.read_bytes(), preprocess) for p in paths])  # type: ignore[arg-type]


def measure_retrieval(bundle_dir: Path, records: Sequence[CaptionedImage], split: str) -> dict[str, RetrievalCheck]:
    """Val rSum of each int8 tower of a (staged) bundle against fp32, as `imgtxt eval --bundle --precision` runs it.

    Args:
        bundle_dir: A bundle with fp32 and int8 graphs of the image and text towers.
        records: The split's images with their captions.
        split: The split's name (recorded).

    Returns:
        `image` and `text` -> the rSum with that tower at int8 and the other at fp32, against both at fp32.
    """
    from imgtxt.encoders.bulk import encode_with_bundle

    paths = [r.path for r in records]
    captions = [c for r in records for c in r.captions]
    owners = np.asarray([i for i, r in enumerate(records) for _ in r.captions], dtype=np.int64)
    image32, text32, _ = encode_with_bundle(bundle_dir, paths, captions, device="cpu", precision="fp32")
    image8, text8, _ = encode_with_bundle(bundle_dir, paths, captions, device="cpu", precision="int8")
    fp32 = float(retrieval_metrics(image32 @ text32.T, owners)["rsum"])
    checks = {
        "image": RetrievalCheck(split, len(records), fp32, float(retrieval_metrics(image8 @ text32.T, owners)["rsum"])),
        "text": RetrievalCheck(split, len(records), fp32, float(retrieval_metrics(image32 @ text8.T, owners)["rsum"])),
    }
    for modality, check in checks.items():
        logger.info(
            "int8 retrieval check",
            extra={"modality": modality, "split": split, "fp32_rsum": fp32, "rsum_loss": check.rsum_loss},
        )
    return checks
