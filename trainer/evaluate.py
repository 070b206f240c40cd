"""`imgtxt eval`: R@K retrieval evaluation of a checkpoint (PyTorch) or a model bundle (ONNX Runtime, no torch).

`imgtxt eval --bundle DIR | --checkpoint PATH [--data PATH] [--split val] [--limit N] [--judgments TSV] [--json OUT]`
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from imgtxt.config import apply_env_defaults
from imgtxt.datasets import default_data_root, load_captioned_images
from imgtxt.logs import add_logging_flags, setup_logging
from imgtxt.metrics import graded_kendall_tau, retrieval_metrics
from imgtxt.preprocess import preprocess_image

logger = logging.getLogger(__name__)


def encode_with_bundle(
    bundle_dir: Path, image_paths: list[Path], captions: list[str], batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Encodes images and captions with a bundle's ONNX graphs, through the serving preprocessing (numpy only)."""
    return bundle_images(bundle_dir, image_paths, batch_size), bundle_texts(bundle_dir, captions, batch_size * 4)


def bundle_images(bundle_dir: Path, image_paths: list[Path], batch_size: int = 32) -> np.ndarray:
    """(n, D) embeddings of image files by a bundle's image graph (ONNX Runtime CPU), through the serving decode."""
    import onnxruntime as ort

    from imgtxt.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    session = ort.InferenceSession(str(bundle.file(m.image.file)), providers=["CPUExecutionProvider"])
    out = []
    for start in tqdm(range(0, len(image_paths), batch_size), desc="images", unit="batch", leave=False):
        pixels = np.stack(
            [preprocess_image(p.read_bytes(), m.image_preprocess) for p in image_paths[start : start + batch_size]]
        )
        out.append(session.run([m.image.output], {"pixel_values": pixels})[0])
    return np.concatenate(out)


def bundle_texts(bundle_dir: Path, captions: list[str], batch_size: int = 128) -> np.ndarray:
    """(n, D) embeddings of captions by a bundle's text graph (ONNX Runtime CPU) and tokenizer."""
    import onnxruntime as ort

    from imgtxt.bundle import load_bundle
    from imgtxt.text import TextTokenizer

    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    session = ort.InferenceSession(str(bundle.file(m.text.file)), providers=["CPUExecutionProvider"])
    tokenizer = TextTokenizer.from_file(bundle.file(m.text_config.tokenizer_file), m.text_config)
    out = []
    for start in tqdm(range(0, len(captions), batch_size), desc="captions", unit="batch", leave=False):
        enc = tokenizer.encode(captions[start : start + batch_size])
        out.append(session.run([m.text.output], {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask})[0])
    return np.concatenate(out)


def encode_with_checkpoint(
    checkpoint: Path, image_paths: list[Path], captions: list[str], batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Encodes images and captions with a training checkpoint's PyTorch towers (full forward, eval transform)."""
    import torch

    from imgtxt.datasets import CaptionedImage
    from trainer.checkpoint import load_checkpoint
    from trainer.data import CaptionTable, PixelSource
    from trainer.encode import encode_split

    model = load_checkpoint(checkpoint).model
    # One pseudo-record per image; captions are encoded in the given order, independent of their owners.
    table = CaptionTable([CaptionedImage(i, str(p), p, ("-",), "eval") for i, p in enumerate(image_paths)],
                         list(captions), np.zeros(len(captions), np.int64))  # fmt: skip
    source = PixelSource(model, table, image_split=0, text_split=1)
    return encode_split(model, source, table, 0, 1, batch_size, torch.device("cpu"))


def read_judgments(path: Path, image_row: dict[str, int], n_texts: int) -> list[tuple[int, int, float]]:
    """Reads a graded-judgment TSV: `image key <TAB> caption index (row in the split's caption list) <TAB> score`."""
    out = []
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) < 3 or row[0] not in image_row or not row[1].isdigit() or int(row[1]) >= n_texts:
                raise SystemExit(f"imgtxt eval: {path}:{n}: expected 'image_key<TAB>caption_index<TAB>score'")
            out.append((image_row[row[0]], int(row[1]), float(row[2])))
    return out


def build_parser() -> argparse.ArgumentParser:
    """Flags of `imgtxt eval`."""
    parser = argparse.ArgumentParser(prog="imgtxt eval", description="Image–text retrieval evaluation (R@K, rSum).")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", type=Path, help="model bundle directory (ONNX Runtime)")
    src.add_argument("--checkpoint", type=Path, help="training checkpoint (PyTorch)")
    parser.add_argument("--data", type=Path, default=None, help="dataset file or directory (default: Flickr8k)")
    parser.add_argument("--split", default="val", help="split to evaluate")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    parser.add_argument("--judgments", type=Path, default=None, help="graded judgments TSV for Kendall τ")
    parser.add_argument("--batch-size", type=int, default=32, help="images per encoding batch")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    add_logging_flags(parser)
    apply_env_defaults(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`imgtxt eval`."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.log_json)
    records = load_captioned_images(args.data or default_data_root(), args.split, args.limit)
    if not records:
        raise SystemExit(f"imgtxt eval: split {args.split!r} is empty")
    paths = [r.path for r in records]
    captions = [c for r in records for c in r.captions]
    owners = np.asarray([i for i, r in enumerate(records) for _ in r.captions], dtype=np.int64)
    t0 = time.perf_counter()
    if args.bundle is not None:
        img, txt = encode_with_bundle(args.bundle, paths, captions, args.batch_size)
    else:
        img, txt = encode_with_checkpoint(args.checkpoint, paths, captions, args.batch_size)
    sim = img @ txt.T
    result: dict[str, object] = {
        "source": str(args.bundle or args.checkpoint),
        "split": args.split,
        "n_images": len(records),
        "n_texts": len(captions),
        "encode_s": round(time.perf_counter() - t0, 2),
        **retrieval_metrics(sim, owners),
    }
    if args.judgments is not None:
        rows = {r.key: i for i, r in enumerate(records)}
        result.update(graded_kendall_tau(sim, read_judgments(args.judgments, rows, len(captions))))
    text = json.dumps(result, indent=2)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0
