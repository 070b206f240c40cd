"""Export of trained towers to a model bundle: one ONNX graph per tower, checked, parity-tested, hashed.

`imgtxt export --run RUN_DIR | --checkpoint PATH --out BUNDLE_DIR [--version V] [--fp16] [--flip-average]
[--image-size N]`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import logging
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image
from torch import Tensor, nn

from imgtxt.bundle import Bundle, Manifest, Parity, TowerSpec, write_bundle
from imgtxt.config import apply_env_defaults
from imgtxt.errors import BundleError
from imgtxt.logs import add_logging_flags, setup_logging
from imgtxt.preprocess import ImagePreprocessConfig, preprocess_image
from imgtxt.text import TextConfig, TextTokenizer
from trainer.model import DualEncoder, ModelSpec, mirror_mean, tokenizer_path

logger = logging.getLogger(__name__)

OPSET = 17
MIN_COSINE = 0.9999
"""Export fails when any torch-vs-ONNX output row has a lower cosine similarity than this."""
MIN_COSINE_FP16 = 0.99
"""The (looser) bound for the optional fp16 graphs."""

PARITY_CAPTIONS = (
    "A dog runs across the grass.",
    "Two children in red jackets are playing in the snow near a wooden fence .",
    "a man",
    "A woman rides a bicycle down a busy city street while people watch from the sidewalk cafe on the corner .",
    "Surfer on a big wave",
    "Several people stand on a rocky hill looking at the mountains in the distance .",
)


@dataclass(frozen=True)
class ExportedGraph:
    """One exported tower graph with its parity figures."""

    path: Path
    """The ONNX file written."""
    parity: Parity
    """torch vs onnxruntime agreement on real inputs."""


def _synthetic_jpegs(count: int, seed: int) -> list[bytes]:
    """Varied photo-like test images (gradients, blocks, noise, odd sizes) as JPEG bytes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        h, w = int(rng.integers(120, 400)), int(rng.integers(120, 400))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=-1) * 255 * rng.uniform(0.3, 1.0, 3)
        noise = rng.normal(0, 20 * (i % 3), (h, w, 3))
        img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def parity_image_inputs(cfg: ImagePreprocessConfig, images: Sequence[Path] = (), count: int = 6) -> np.ndarray:
    """Image tower inputs for parity checks, through the serving preprocessing path: given files, else synthetic."""
    data = [p.read_bytes() for p in images][:count] or _synthetic_jpegs(count, seed=0)
    return np.stack([preprocess_image(d, cfg) for d in data])


def parity_text_inputs(tokenizer_file: Path, cfg: TextConfig) -> tuple[np.ndarray, np.ndarray]:
    """Tokenized captions of varied lengths for parity checks."""
    batch = TextTokenizer.from_file(tokenizer_file, cfg).encode(list(PARITY_CAPTIONS))
    return batch.input_ids, batch.attention_mask


def measure_parity(module: nn.Module, onnx_path: Path, feeds: dict[str, np.ndarray]) -> Parity:
    """Runs the torch module and the ONNX graph (onnxruntime CPU) on the same inputs and compares the outputs."""
    with torch.no_grad():
        expected = module(*(torch.from_numpy(v) for v in feeds.values())).float().numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(["embedding"], feeds)
    actual = actual.astype(np.float32)
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
) -> ExportedGraph:
    """Exports one tower: TorchScript-based ONNX export, `onnx.checker`, metadata, then parity on `feeds`.

    Args:
        reference: Module the graph's outputs are compared with (default `module` itself; the float32 tower when
            `module` is its fp16 variant).
        min_cosine: Parity gate.

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
            output_names=["embedding"],
            dynamic_axes={**dynamic, "embedding": {0: "batch"}},
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
    parity = measure_parity(reference or module, path, feeds)
    logger.info("exported %s", path.name, extra={"max_abs_diff": parity.max_abs_diff, "min_cosine": parity.min_cosine})
    if not parity.min_cosine >= min_cosine:  # also catches NaN
        raise BundleError(
            f"{path.name}: ONNX output disagrees with torch (min cosine {parity.min_cosine:.6f} < {min_cosine}, "
            f"max |diff| {parity.max_abs_diff:.3g})"
        )
    return ExportedGraph(path, parity)


class _Fp16(nn.Module):
    """Runs a module in half precision behind float32 inputs and outputs (the fp16 graph variant)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.half()

    def forward(self, *args: Tensor) -> Tensor:
        cast = [a.half() if a.is_floating_point() else a for a in args]
        return self.module(*cast).float()


class FlipAveraged(nn.Module):
    """Image tower whose embedding is `mirror_mean` of the image's and its mirror image's embeddings.

    Horizontal-flip test-time augmentation inside the graph: one pass over a batch twice the size (so about twice
    the image encode cost), served and indexed like any image tower.
    """

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, pixel_values: Tensor) -> Tensor:
        n = pixel_values.shape[0]
        both = self.tower(torch.cat([pixel_values, pixel_values.flip(-1)]))
        return mirror_mean(both[:n], both[n:])


def export_model(
    model: DualEncoder,
    out_dir: Path,
    version: str,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    fp16: bool = False,
    parity_images: Sequence[Path] = (),
    flip_average: bool | None = None,
    image_size: int | None = None,
) -> Bundle:
    """Exports a dual encoder's towers (and unit head) into a new model bundle at `out_dir`.

    Args:
        model: The trained model (moved to CPU float32 here).
        out_dir: The bundle directory to create (must not exist or be empty).
        version: Bundle version string.
        training: Resolved training config, recorded in the manifest.
        metrics: Evaluation figures, recorded in the manifest.
        fp16: Also write an fp16 variant of each graph (float32 inputs and outputs) for GPU serving.
        parity_images: Real image files to measure parity on (synthetic photos when empty).
        flip_average: Export the image tower as `FlipAveraged` (recorded as `training.export.flip_average`);
            None: as the model was trained and validated (`ModelSpec.flip_average`).
        image_size: Serve at this image side instead of the trained `image_size` (recorded as
            `training.export.image_size`): the towers are convolutional + pooled, so any side runs, and a side larger
            than the training crops can retrieve better ("FixRes"); `imgtxt eval --bundle` measures it.

    Raises:
        BundleError: A graph fails parity, or `out_dir` is not empty.
    """
    if out_dir.exists() and any(out_dir.iterdir()):
        raise BundleError(f"bundle directory {out_dir} exists and is not empty; bundles are immutable, pick a new path")
    model = model.cpu().float().eval()
    if image_size is not None and image_size < 8:
        raise BundleError(f"image_size must be >= 8, got {image_size}")
    overrides: dict[str, Any] = {
        k: v for k, v in (("image_size", image_size), ("flip_average", flip_average)) if v is not None
    }
    if overrides:
        model = copy.copy(model)  # a shallow copy with its own spec: the caller's model keeps what it was trained as
        model.spec = dataclasses.replace(model.spec, **overrides)
    flip_average = model.spec.flip_average
    image_tower: nn.Module = FlipAveraged(model.image) if flip_average else model.image
    img_cfg, txt_cfg = model.image_preprocess, model.text_config
    pixel_values = parity_image_inputs(img_cfg, parity_images)
    input_ids, attention_mask = parity_text_inputs(tokenizer_path(), txt_cfg)
    common = {"imgtxt.bundle_version": version, "imgtxt.normalized": "true"}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files: dict[str, str | Path] = {"tokenizer.json": tokenizer_path()}
        towers: dict[str, TowerSpec] = {}
        fp16_parity: dict[str, dict[str, float]] = {}
        jobs: list[tuple[str, nn.Module, dict[str, np.ndarray], dict[str, dict[int, str]], str]] = [
            ("image", image_tower, {"pixel_values": pixel_values}, {"pixel_values": {0: "batch"}},
             json.dumps(img_cfg.to_dict(), sort_keys=True)),
            ("text", model.text, {"input_ids": input_ids, "attention_mask": attention_mask},
             {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}},
             json.dumps(txt_cfg.to_dict(), sort_keys=True)),
        ]  # fmt: skip
        if model.unit is not None:
            with torch.no_grad():
                n = min(len(pixel_values), len(input_ids))
                img_emb = image_tower(torch.from_numpy(pixel_values[:n])).numpy()
                txt_emb = model.text(torch.from_numpy(input_ids[:n]), torch.from_numpy(attention_mask[:n])).numpy()
            jobs.append(("unit", model.unit, {"image": img_emb, "text": txt_emb},
                         {"image": {0: "batch"}, "text": {0: "batch"}}, "{}"))  # fmt: skip
        for name, module, feeds, dynamic, preprocess in jobs:
            meta = {**common, "imgtxt.modality": name, "imgtxt.preprocess": preprocess}
            graph = export_onnx(module, feeds, tmp / f"{name}_tower.onnx", dynamic, meta)
            files[graph.path.name] = graph.path
            fp16_file = None
            if fp16:
                fp16_file = f"{name}_tower.fp16.onnx"
                half = _export_fp16(module, feeds, tmp / fp16_file, dynamic, {**meta, "imgtxt.precision": "fp16"})
                fp16_parity[name] = asdict(half)
                files[fp16_file] = tmp / fp16_file
            towers[name] = TowerSpec(graph.path.name, list(feeds), "embedding", graph.parity, fp16_file)
        manifest = Manifest(
            bundle_version=version,
            embedding_dim=model.spec.embedding_dim,
            image=towers["image"],
            text=towers["text"],
            unit=towers.get("unit"),
            image_preprocess=img_cfg,
            text_config=txt_cfg,
            onnx_opset=OPSET,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            training={
                **(training or {"model": model.spec.__dict__}),
                "export": {"flip_average": flip_average, "image_size": img_cfg.image_size},
            },
            metrics={**(metrics or {}), **({"fp16_parity": fp16_parity} if fp16_parity else {})},
        )
        return write_bundle(out_dir, manifest, files)


def _export_fp16(
    module: nn.Module,
    feeds: dict[str, np.ndarray],
    path: Path,
    dynamic: dict[str, dict[int, str]],
    meta: dict[str, str],
) -> Parity:
    """fp16 variant: half-precision weights and compute behind a float32 interface.

    Its parity against the float32 torch module is measured and recorded (manifest `metrics.fp16_parity`) and gated
    loosely (cosine >= MIN_COSINE_FP16): half precision cannot meet the float32 bound, but a broken graph fails.
    """
    half = _Fp16(copy.deepcopy(module))
    return export_onnx(half, feeds, path, dynamic, meta, reference=module, min_cosine=MIN_COSINE_FP16).parity


def tiny_model(dim: int = 32, seed: int = 0, with_unit: bool = True, image_size: int = 32) -> DualEncoder:
    """Tiny random-weight towers (conv image tower, one-layer text tower) over the MiniLM tokenizer vocabulary."""
    torch.manual_seed(seed)
    spec = ModelSpec(
        image_backbone="tiny", text_backbone="tiny", dim=dim, image_size=image_size, max_tokens=32, with_unit=with_unit
    )
    return DualEncoder(spec).eval()


def export_tiny_bundle(out_dir: Path, dim: int = 32, seed: int = 0, with_unit: bool = True) -> Path:
    """Builds tiny random-weight towers and exports them through the same path as real towers (for tests and demos).

    Returns:
        The bundle directory.
    """
    model = tiny_model(dim, seed, with_unit)
    bundle = export_model(model, Path(out_dir), version=f"tiny-d{dim}-s{seed}")
    return bundle.path


def build_parser() -> argparse.ArgumentParser:
    """Flags of `imgtxt export`."""
    parser = argparse.ArgumentParser(prog="imgtxt export", description="Export a trained checkpoint to a model bundle.")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="run directory (its checkpoints/best.pt is exported)")
    src.add_argument("--checkpoint", type=Path, help="checkpoint file to export")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to create (must not exist)")
    parser.add_argument("--version", default=None, help="bundle version (default: <run name>-<UTC time>)")
    parser.add_argument("--fp16", action="store_true", help="also write fp16 graphs (float32 inputs/outputs)")
    parser.add_argument(
        "--flip-average",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="embed each image with its mirror image (~2x image encode cost); default: as trained (flip_average key)",
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help="serve at this image side (default: the trained image_size)"
    )
    parser.add_argument("--parity-images", type=Path, default=None, help="dataset to draw real parity images from")
    add_logging_flags(parser)
    apply_env_defaults(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`imgtxt export`: checkpoint -> ONNX model bundle."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.log_json)
    from trainer.checkpoint import load_checkpoint

    ckpt_path = args.checkpoint or args.run / "checkpoints" / "best.pt"
    if not ckpt_path.is_file():
        raise SystemExit(f"imgtxt export: checkpoint {ckpt_path} not found")
    ckpt = load_checkpoint(ckpt_path)
    version = args.version or f"{ckpt_path.parent.parent.name}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    images: list[Path] = []
    if args.parity_images is not None:
        from imgtxt.datasets import load_captioned_images

        images = [r.path for r in load_captioned_images(args.parity_images, split="val", limit=6)]
    try:
        bundle = export_model(
            ckpt.model, args.out, version, training=ckpt.config, metrics=ckpt.metrics, fp16=args.fp16,
            parity_images=images, flip_average=args.flip_average, image_size=args.image_size,
        )  # fmt: skip
    except BundleError as exc:
        raise SystemExit(f"imgtxt export: {exc}") from exc
    m = bundle.manifest
    for name in ("image", "text", "unit"):
        spec = getattr(m, name)
        if spec is not None and spec.parity is not None:
            print(f"{name:<6} {spec.file}  max|d|={spec.parity.max_abs_diff:.2e}  min cos={spec.parity.min_cosine:.6f}")
    print(f"bundle {m.bundle_version} written to {bundle.path} (sha256 {bundle.sha256})")
    return 0
