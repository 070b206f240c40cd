"""Export of trained towers to a model bundle: one ONNX graph per tower, checked, parity-tested, hashed."""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from imgtxt.bundle import (
    Bundle,
    GraphVariant,
    Manifest,
    ServingSpec,
    TowerSpec,
    trained_quantization,
    trained_unit_head,
    write_bundle,
)
from imgtxt.datasets import CaptionedImage
from imgtxt.errors import BundleError
from trainer.config import flat_view
from trainer.export.fp16 import export_fp16
from trainer.export.int8 import calibration_pixels, export_int8, measure_retrieval
from trainer.export.parity import parity_image_inputs, parity_text_inputs
from trainer.model import DualEncoder, mirror_mean, tokenizer_path
from trainer.onnx_export import OPSET, export_onnx


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


@dataclass(frozen=True)
class _Graph:
    """One graph of the bundle to export: its module and the inputs it is traced and parity-checked on."""

    name: str
    """Modality: image, text or unit (the file is `{name}_tower.onnx`)."""
    module: nn.Module
    """The torch module exported."""
    feeds: dict[str, np.ndarray]
    """Input name -> real inputs."""
    dynamic: dict[str, dict[int, str]]
    """Input name -> dynamic axes."""
    preprocess: str
    """The `imgtxt.preprocess` metadata (JSON) of the graph's inputs."""


def export_model(
    model: DualEncoder,
    out_dir: Path,
    version: str,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    fp16: bool = False,
    int8: bool = False,
    calibration_images: Sequence[Path] = (),
    int8_check: Sequence[CaptionedImage] = (),
    int8_check_split: str = "val",
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
        int8: Also write int8 variants of the image tower (static quantisation calibrated on `calibration_images`)
            and the text tower (dynamic quantisation), for CPU serving (`--precision int8`).
        calibration_images: Training images calibrating the int8 image tower (needed with `int8`).
        int8_check: With `int8`: the val records (images with their captions) on which each int8 tower's rSum is
            measured against fp32 and recorded in the manifest (`GraphVariant.retrieval`); empty: not measured, and
            `--precision auto` will not serve int8.
        int8_check_split: The name of that split (recorded).
        parity_images: Real image files to measure parity on (synthetic photos when empty).
        flip_average: Export the image tower as `FlipAveraged` (recorded as `training.export.flip_average`);
            None: as the model was trained and validated (`ModelSpec.flip_average`).
        image_size: Serve at this image side instead of the trained `image_size` (recorded as
            `training.export.image_size`): the towers are convolutional + pooled, so any side runs, and a side larger
            than the training crops can retrieve better ("FixRes"); `imgtxt eval --bundle` measures it.

    Raises:
        BundleError: A graph fails parity, or `out_dir` is not empty.
    """
    if int8 and not calibration_images:
        raise BundleError("int8 export needs calibration_images (training images for the image tower's ranges)")
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
    graphs = [
        _Graph(
            name="image",
            module=image_tower,
            feeds={"pixel_values": pixel_values},
            dynamic={"pixel_values": {0: "batch"}},
            preprocess=json.dumps(img_cfg.to_dict(), sort_keys=True),
        ),
        _Graph(
            name="text",
            module=model.text,
            feeds={"input_ids": input_ids, "attention_mask": attention_mask},
            dynamic={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}},
            preprocess=json.dumps(txt_cfg.to_dict(), sort_keys=True),
        ),
    ]
    if model.unit is not None:
        with torch.no_grad():
            n = min(len(pixel_values), len(input_ids))
            img_emb = image_tower(torch.from_numpy(pixel_values[:n])).numpy()
            txt_emb = model.text(torch.from_numpy(input_ids[:n]), torch.from_numpy(attention_mask[:n])).numpy()
        graphs.append(
            _Graph(
                name="unit",
                module=model.unit,
                feeds={"image": img_emb, "text": txt_emb},
                dynamic={"image": {0: "batch"}, "text": {0: "batch"}},
                preprocess="{}",
            )
        )
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files: dict[str, str | Path] = {"tokenizer.json": tokenizer_path()}
        towers: dict[str, TowerSpec] = {}
        precisions: dict[str, dict[str, GraphVariant]] = {"fp32": {}}
        # Each graph is exported, checked and parity-gated against torch: seconds to minutes per tower on a CPU.
        bar = tqdm(graphs, desc="export", unit="graph", disable=None, leave=False)
        for g in bar:
            bar.set_postfix_str(f"{g.name} tower" + (" + fp16" if fp16 else "") + (" + int8" if int8 else ""))
            meta = {**common, "imgtxt.modality": g.name, "imgtxt.preprocess": g.preprocess}
            graph = export_onnx(g.module, g.feeds, tmp / f"{g.name}_tower.onnx", g.dynamic, meta)
            files[graph.path.name] = graph.path
            precisions["fp32"][g.name] = GraphVariant(graph.path.name, graph.parity)
            if int8 and g.name in ("image", "text"):
                int8_file = f"{g.name}_tower.int8.onnx"
                calibration = calibration_pixels(calibration_images, img_cfg) if g.name == "image" else None
                quantized = export_int8(graph.path, tmp / int8_file, g.name, g.module, g.feeds, calibration)
                precisions.setdefault("int8", {})[g.name] = GraphVariant(int8_file, quantized)
                files[int8_file] = tmp / int8_file
            if fp16:
                fp16_file = f"{g.name}_tower.fp16.onnx"
                half = export_fp16(g.module, g.feeds, tmp / fp16_file, g.dynamic, {**meta, "imgtxt.precision": "fp16"})
                precisions.setdefault("fp16", {})[g.name] = GraphVariant(fp16_file, half)
                files[fp16_file] = tmp / fp16_file
            towers[g.name] = TowerSpec(graph.path.name, list(g.feeds), "embedding", graph.parity)
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
            metrics=dict(metrics or {}),
            serving=ServingSpec(
                image_size=img_cfg.image_size,
                flip_average=flip_average,
                # The config is saved grouped; `trained_quantization` reads the flat keys `losses`, `loss_kwargs`.
                quantization=trained_quantization(flat_view(training or {})),
                unit_head=model.unit is not None,
                # "Trained" only when a unit loss with positive weight trained the head.
                unit_head_trained=trained_unit_head(flat_view(training or {}), model.unit is not None),
                precisions=precisions,
            ),
        )
        if int8 and int8_check:
            manifest = _with_retrieval_checks(manifest, files, int8_check, int8_check_split)
        return write_bundle(out_dir, manifest, files)


def _with_retrieval_checks(
    manifest: Manifest, files: dict[str, str | Path], records: Sequence[CaptionedImage], split: str
) -> Manifest:
    """The manifest with each int8 tower's val rSum against fp32, measured on the bundle staged in a temporary
    directory (through the serving path, as `imgtxt eval --bundle --precision` measures it)."""
    with tempfile.TemporaryDirectory() as staging:
        staged = write_bundle(Path(staging) / "bundle", manifest, files)
        checks = measure_retrieval(staged.path, records, split)
    serving = manifest.serving
    int8 = {m: dataclasses.replace(v, retrieval=checks.get(m)) for m, v in serving.precisions["int8"].items()}
    return dataclasses.replace(
        manifest, serving=dataclasses.replace(serving, precisions={**serving.precisions, "int8": int8})
    )
