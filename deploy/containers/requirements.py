"""Prints the serving install's requirements (pyproject.toml's dependencies) with one chosen ONNX Runtime package.

Run inside the image build: `python requirements.py pyproject.toml onnxruntime > requirements.txt`. pyproject.toml
names `onnxruntime-gpu` on Linux x86_64 and `onnxruntime` elsewhere; the CPU image wants the (much smaller) CPU build
on Linux too. The two share the `onnxruntime` module, so exactly one of them is printed, with pyproject's version range.
"""

from __future__ import annotations

import sys
import tomllib

from pip._vendor.packaging.requirements import Requirement

ORT_PACKAGES = ("onnxruntime", "onnxruntime-gpu")


def serving_requirements(pyproject: str, onnxruntime: str) -> list[str]:
    """The `[project].dependencies` that apply here, the applicable ONNX Runtime one renamed to `onnxruntime`.

    Args:
        pyproject: Path of pyproject.toml.
        onnxruntime: `onnxruntime` (CPU build) or `onnxruntime-gpu`.
    """
    if onnxruntime not in ORT_PACKAGES:
        raise SystemExit(f"requirements.py: ONNXRUNTIME must be one of {', '.join(ORT_PACKAGES)}, got {onnxruntime!r}")
    with open(pyproject, "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    out = []
    for line in dependencies:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        if req.name in ORT_PACKAGES:
            req.name = onnxruntime
        req.marker = None
        out.append(str(req))
    if sum(Requirement(r).name in ORT_PACKAGES for r in out) != 1:
        raise SystemExit(f"requirements.py: expected one ONNX Runtime requirement for this platform in {pyproject}")
    return out


if __name__ == "__main__":
    print("\n".join(serving_requirements(sys.argv[1], sys.argv[2])))
