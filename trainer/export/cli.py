"""`imgtxt export --run RUN_DIR | --checkpoint PATH --out BUNDLE_DIR [--version V] [--fp16] [--int8 [--no-int8-check]]
[--[no-]flip-average] [--image-size N] [--parity-images DATA]`: a checkpoint's towers -> a model bundle."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from imgtxt.config import HelpFormatter, apply_env_defaults
from imgtxt.datasets import CaptionedImage
from imgtxt.errors import EXIT_OK, BundleError, ConfigError, fail
from imgtxt.logs import add_logging_flags, setup_logging
from trainer.export.bundle import export_model


def build_parser() -> argparse.ArgumentParser:
    """Flags of `imgtxt export`."""
    parser = argparse.ArgumentParser(
        prog="imgtxt export",
        description="Export a trained checkpoint to a model bundle.",
        formatter_class=HelpFormatter,
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="run directory (its checkpoints/best.pt is exported)")
    src.add_argument("--checkpoint", type=Path, help="checkpoint file to export")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to create (must not exist)")
    parser.add_argument("--version", default=None, help="bundle version (default: <run name>-<UTC time>)")
    parser.add_argument("--fp16", action="store_true", help="also write fp16 graphs (float32 inputs/outputs)")
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also write int8 graphs for CPU serving: the image tower statically quantised (calibrated on training "
        "images), the text tower dynamically",
    )
    parser.add_argument(
        "--calibration-data",
        type=Path,
        default=None,
        help="dataset whose train split calibrates the int8 image tower (default: the run's training data)",
    )
    parser.add_argument("--calibration-images", type=int, default=128, help="training images calibrating int8")
    parser.add_argument(
        "--int8-check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --int8: measure each int8 tower's val rSum against fp32 on the same dataset's val split and record "
        "it in the manifest (--precision auto serves int8 on CPU only where the loss is at most 0.5)",
    )
    parser.add_argument(
        "--check-images", type=int, default=None, help="val images of the int8 check (default: the whole split)"
    )
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
        return fail("imgtxt export", FileNotFoundError(f"checkpoint {ckpt_path} not found"))
    ckpt = load_checkpoint(ckpt_path)
    version = args.version or f"{ckpt_path.parent.parent.name}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    images: list[Path] = []
    if args.parity_images is not None:
        from imgtxt.datasets import load_captioned_images

        images = [r.path for r in load_captioned_images(args.parity_images, split="val", limit=6)]
    calibration: list[Path] = []
    check: list[CaptionedImage] = []
    check_split = "val"
    if args.int8:
        from imgtxt.datasets import load_captioned_images

        source = args.calibration_data or (ckpt.config.get("data") or {}).get("path")
        if not source:
            return fail(
                "imgtxt export",
                ConfigError("--int8: give --calibration-data (the run's training data is not recorded)"),
            )
        train_split = (ckpt.config.get("data") or {}).get("train_split", "train")
        records = load_captioned_images(Path(source), split=train_split, limit=args.calibration_images)
        calibration = [r.path for r in records]
        check_split = (ckpt.config.get("data") or {}).get("val_split", "val")
        if args.int8_check:
            check = load_captioned_images(Path(source), split=check_split, limit=args.check_images)
    try:
        bundle = export_model(
            ckpt.model,
            args.out,
            version,
            training=ckpt.config,
            metrics=ckpt.metrics,
            fp16=args.fp16,
            int8=args.int8,
            calibration_images=calibration,
            int8_check=check,
            int8_check_split=check_split,
            parity_images=images,
            flip_average=args.flip_average,
            image_size=args.image_size,
        )
    except BundleError as exc:
        return fail("imgtxt export", exc)
    m = bundle.manifest
    for precision, towers in m.serving.precisions.items():
        for name, variant in towers.items():
            print(f"{name:<6} {precision:<5} {variant.file}  {variant.describe()}")
    print(f"bundle {m.bundle_version} written to {bundle.path} (sha256 {bundle.sha256})")
    return EXIT_OK
