"""Export of trained towers to a model bundle (`imgtxt export`): ONNX graphs, parity, fp16 variant, the CLI."""

from trainer.export.bundle import FlipAveraged, export_model
from trainer.export.cli import build_parser, main
from trainer.export.fp16 import MIN_COSINE_FP16, HalfPrecision, export_fp16
from trainer.export.parity import PARITY_CAPTIONS, parity_image_inputs, parity_text_inputs

__all__ = [
    "MIN_COSINE_FP16",
    "PARITY_CAPTIONS",
    "FlipAveraged",
    "HalfPrecision",
    "build_parser",
    "export_fp16",
    "export_model",
    "main",
    "parity_image_inputs",
    "parity_text_inputs",
]
