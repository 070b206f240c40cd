"""ONNX vs PyTorch parity and ONNX Runtime vs PyTorch eager encode speed, per tower, same threads and batch.

    .venv/bin/python -m benchmarks.export_speed [--checkpoint PATH | --tiny] [--threads 2] [--batch 16] [--repeats 5]

Without --checkpoint, exports EfficientNet-Lite0 + MiniLM towers with untrained heads (speed and parity do not depend
on the head weights). Prints one line per tower with the measured ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import Report, add_results_flag
from imgtxt.encoders.session import SessionConfig, create_session
from trainer.export import PARITY_CAPTIONS, export_model, parity_image_inputs, parity_text_inputs
from trainer.model import DualEncoder, ModelSpec, tokenizer_path
from trainer.testing import tiny_model


def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    """Exports, then times torch eager and onnxruntime on the same inputs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=Path, default=None)
    src.add_argument("--tiny", action="store_true", help="tiny random towers (a seconds-long smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    add_results_flag(parser)
    args = parser.parse_args(argv)
    report = Report("export_speed", argv, args.results)
    rows = []
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        from trainer.checkpoint import load_checkpoint

        model = load_checkpoint(args.checkpoint).model
    elif args.tiny:
        model = tiny_model()
    else:
        model = DualEncoder(ModelSpec(with_unit=False)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_model(model, Path(tmp) / "bundle", version="speed")
        m = bundle.manifest
        cfg = SessionConfig(device="cpu", intra_op_threads=args.threads)
        sessions = {name: create_session(bundle.file(m.tower(name).file), cfg) for name in ("image", "text")}
        reps = -(-args.batch // len(PARITY_CAPTIONS))
        pixels = np.concatenate([parity_image_inputs(m.image_preprocess, count=6)] * reps)[: args.batch]
        ids, mask = parity_text_inputs(tokenizer_path(), m.text_config)
        ids, mask = np.concatenate([ids] * reps)[: args.batch], np.concatenate([mask] * reps)[: args.batch]
        text_feeds = {"input_ids": ids, "attention_mask": mask}
        cases = {
            "image": (lambda: model.image(torch.from_numpy(pixels)), {"pixel_values": pixels}),
            "text": (lambda: model.text(torch.from_numpy(ids), torch.from_numpy(mask)), text_feeds),
        }
        report.line(f"threads={args.threads} batch={args.batch} repeats={args.repeats} (median)")
        for name, (eager, feeds) in cases.items():
            parity = m.tower(name).parity
            assert parity is not None
            with torch.inference_mode():
                t_torch = _time(eager, args.repeats)
            sess = sessions[name]
            t_ort = _time(lambda s=sess, f=feeds: s.run(["embedding"], f), args.repeats)  # type: ignore[misc]
            rows.append(
                {
                    "tower": name,
                    "torch_per_s": round(args.batch / t_torch, 1),
                    "ort_per_s": round(args.batch / t_ort, 1),
                }
            )
            report.line(
                f"{name:<5} parity max|d|={parity.max_abs_diff:.2e} min cos={parity.min_cosine:.7f}  "
                f"torch {args.batch / t_torch:7.1f} items/s  onnxruntime {args.batch / t_ort:7.1f} items/s  "
                f"ratio ort/torch = {t_torch / t_ort:.2f}x"
            )
    report.save(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
