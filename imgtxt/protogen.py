"""Generates the Python gRPC stubs in `imgtxt/v1/` from `protos/` (run `python -m imgtxt.protogen`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def proto_files() -> list[Path]:
    """All `.proto` files of the wire contract, sorted."""
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path = ROOT) -> list[Path]:
    """Compiles every proto into `out_dir` (the directory layout mirrors the proto package).

    Args:
        out_dir: Root under which `imgtxt/v1/*_pb2*.py` are written.

    Returns:
        The generated files.

    Raises:
        RuntimeError: When `protoc` reports an error.
    """
    import grpc_tools
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    include = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    generated = []
    for f in files:
        stem = Path(f).with_suffix("")
        generated += [out_dir / f"{stem}_pb2.py", out_dir / f"{stem}_pb2.pyi", out_dir / f"{stem}_pb2_grpc.py"]
    return generated


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m imgtxt.protogen", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository root)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
