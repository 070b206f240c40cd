"""Indexing benchmark: end-to-end `imgtxt index` throughput vs the image service's own streaming encode throughput.

Both services run as subprocesses (as in production); the same images are (a) streamed straight through the image
service with the client, bytes preloaded, nothing else done, and (b) indexed end to end (read files -> stream through
the service -> build points -> upsert into the embedded Qdrant, with checkpoints). The ratio b/a is the indexer's
efficiency (target >= 0.8).

    PYTHONPATH=. .venv/bin/python benchmarks/index_throughput.py --bundle BUNDLE --images 500
    # a bundle with the real architectures (untrained heads; the encode cost is what matters here):
    PYTHONPATH=. .venv/bin/python benchmarks/index_throughput.py --make-bundle /tmp/bench-bundle ...
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.report import Report, add_results_flag
from imgtxt.client import ImageEncoderClient, ServiceEncoder
from imgtxt.datasets import default_data_root
from imgtxt.encoders.unit import UnitEncoder
from imgtxt.supervisor import run_services
from indexer import IndexConfig, read_records, run_index
from store.base import CollectionConfig
from store.factory import open_store


def make_bundle(out: Path) -> Path:
    """Exports the real architectures (EfficientNet-Lite0 + MiniLM, pretrained backbones, untrained heads)."""
    from trainer.export import export_model
    from trainer.model import DualEncoder, ModelSpec

    if (out / "manifest.json").is_file():
        return out
    model = DualEncoder(ModelSpec()).eval()
    return export_model(model, out, version="bench-lite0-minilm").path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path)
    p.add_argument("--make-bundle", type=Path, help="export a real-architecture bundle here (needs torch) and use it")
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--split", default="val")
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--kinds", default="image", help="kinds for the end-to-end run (image = like for like)")
    add_results_flag(p)
    args = p.parse_args(argv)
    out = Report("index_throughput", argv, args.results)
    bundle = make_bundle(args.make_bundle) if args.make_bundle else args.bundle
    if bundle is None:
        p.error("--bundle or --make-bundle is required")
    records = list(read_records(args.data, split=args.split, limit=args.images))
    images = [r.image.read_bytes() for r in records if r.image is not None]
    kinds = tuple(args.kinds.split(","))
    with run_services(bundle) as (image_svc, text_svc):
        client = ImageEncoderClient(image_svc.target)
        for _ in client.encode_stream(images[:64], args.batch_size):  # warm-up
            pass
        t0 = time.perf_counter()
        n = sum(len(r) for r in client.encode_stream(images, args.batch_size))
        service_rate = n / (time.perf_counter() - t0)
        client.close()

        encoder = ServiceEncoder(image_svc.target, text_svc.target, chunk_size=args.batch_size)
        with tempfile.TemporaryDirectory() as tmp:
            store = open_store(tmp)
            from imgtxt.bundle import load_bundle

            job_report = run_index(
                records,
                encoder,
                store,
                "bench",
                CollectionConfig(dim=encoder.dim),
                IndexConfig(kinds=kinds, batch_size=args.batch_size, progress=False),
                fusion=UnitEncoder(load_bundle(bundle)),
                checkpoint=Path(tmp) / "cp.json",
                job={"bench": 1},
            )
            store.close()
        encoder.close()
    index_rate = len(images) / job_report.elapsed_s
    row = {
        "bundle": str(bundle),
        "images": len(images),
        "kinds": list(kinds),
        "service_images_per_s": round(service_rate, 1),
        "index_images_per_s": round(index_rate, 1),
        "points": job_report.total_indexed,
        "stage_seconds": job_report.stage_seconds,
    }
    out.line(json.dumps(row))
    out.line(
        f"service encode: {service_rate:.1f} images/s; end-to-end index ({'+'.join(kinds)}): {index_rate:.1f} images/s"
    )
    out.line(f"ratio index/service = {index_rate / service_rate:.2f} (target >= 0.8)")
    out.save([row])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
