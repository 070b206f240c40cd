"""Variants of the tiny bundle for tests: the same verified ONNX files under a manifest with other serving decisions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from imgtxt.bundle import load_bundle


def bundle_variant(src: Path, dst: Path, version: str, unit_head: bool = True, **serving: Any) -> Path:
    """Copies bundle `src` to `dst` as bundle `version`, with `serving` fields replaced (e.g. quantization="int8").

    `unit_head=False` drops the unit tower, as an export of towers without a trained fusion head does. The result
    loads (and verifies) with `load_bundle`.
    """
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["bundle_version"] = version
    manifest["serving"].update(serving)
    if not unit_head:
        unit_file = manifest["unit"]["file"]
        manifest["unit"] = None
        manifest["serving"]["unit_head"] = False
        manifest["serving"]["unit_head_trained"] = False
        manifest["serving"]["precisions"]["fp32"].pop("unit")
        manifest["files"].pop(unit_file)
        (dst / unit_file).unlink()
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    load_bundle(dst)  # the variant is a valid bundle
    return dst
