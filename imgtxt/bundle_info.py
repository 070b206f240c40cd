"""`imgtxt bundle-info BUNDLE [--json PATH|-]`: verifies a model bundle and describes it."""

from __future__ import annotations

import argparse
from pathlib import Path

from imgtxt.bundle import Bundle, load_bundle
from imgtxt.errors import EXIT_OK, BundleError, fail
from imgtxt.flags import HelpFormatter, add_json_flag, emit


def main(argv: list[str] | None = None) -> int:
    """`imgtxt bundle-info`: verifies a bundle and prints its manifest summary; 0, or 2 for a missing or invalid
    bundle (`imgtxt.errors.exit_code`)."""
    parser = argparse.ArgumentParser(
        prog="imgtxt bundle-info", description="Verify a model bundle and describe it.", formatter_class=HelpFormatter
    )
    parser.add_argument("bundle", type=Path, help="bundle directory")
    add_json_flag(parser, "the whole manifest")
    args = parser.parse_args(argv)
    try:
        bundle = load_bundle(args.bundle)
    except BundleError as exc:
        return fail("imgtxt bundle-info", exc)
    emit(args.json, bundle.manifest.to_dict(), lambda: _print_summary(bundle))
    return EXIT_OK


def _print_summary(bundle: Bundle) -> None:
    m = bundle.manifest
    print(f"bundle     {m.bundle_version}  sha256 {bundle.sha256}")
    print(f"dim        {m.embedding_dim}  normalized={m.normalized}  distance={m.distance}  opset={m.onnx_opset}")
    sv = m.serving
    for precision, towers in sv.precisions.items():
        for modality, variant in towers.items():
            print(f"{modality:<10} {precision}  {variant.file}  {variant.describe()}")
    print(
        f"serving    side {sv.image_size}px  flip_average={sv.flip_average}  trained for quantization="
        f"{sv.quantization}  unit head={sv.unit_provenance}"
    )
    print(
        f"image      {m.image_preprocess.image_size}px {m.image_preprocess.resize} {m.image_preprocess.interpolation}"
    )
    print(f"text       {m.text_config.tokenizer_file} max_tokens={m.text_config.max_tokens}")
