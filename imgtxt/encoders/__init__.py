"""The encoder layer: ONNX Runtime sessions over a model bundle's towers, the one place that runs the graphs.

`ImageEncoder` / `TextEncoder` (one tower each), `UnitEncoder` (the fusion head), `BundleEncoder` (both towers, the
in-process `Encoder` of indexing, search and evaluation), `SessionConfig` / `create_session` (provider selection and
the optimised-graph cache). The services, the indexer's in-process mode, `imgtxt eval --bundle` and the benchmarks
all use them; nothing else in serving, indexing or evaluation opens an `onnxruntime.InferenceSession`.

Names are loaded on first use, so `imgtxt.encoders.types` (results and the `Encoder` protocol, which the gRPC
clients share) imports without ONNX Runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imgtxt.encoders.bundle import BundleEncoder
    from imgtxt.encoders.image import ImageEncoder
    from imgtxt.encoders.session import SessionConfig, create_session
    from imgtxt.encoders.text import TextEncoder
    from imgtxt.encoders.types import EncodeJob, Encoder, EncodeResult, EncoderInfo, ItemCode, ItemOutcome
    from imgtxt.encoders.unit import UnitEncoder

_HOME = {
    "BundleEncoder": "bundle",
    "ImageEncoder": "image",
    "TextEncoder": "text",
    "UnitEncoder": "unit",
    "SessionConfig": "session",
    "create_session": "session",
    "EncodeJob": "types",
    "Encoder": "types",
    "EncodeResult": "types",
    "EncoderInfo": "types",
    "ItemCode": "types",
    "ItemOutcome": "types",
}
__all__ = [
    "BundleEncoder",
    "EncodeJob",
    "EncodeResult",
    "Encoder",
    "EncoderInfo",
    "ImageEncoder",
    "ItemCode",
    "ItemOutcome",
    "SessionConfig",
    "TextEncoder",
    "UnitEncoder",
    "create_session",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
