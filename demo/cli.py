"""`imgtxt demo` (the README's first command): bundle -> both services -> index val -> example queries -> R@K."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import grpc

from evaluation.via_index import evaluate_via_index
from imgtxt.bundle import load_bundle
from imgtxt.client import ServiceEncoder
from imgtxt.config import apply_env_defaults, positive_int
from imgtxt.datasets import default_data_root, load_captioned_images
from imgtxt.encoders.unit import UnitEncoder
from imgtxt.errors import ImgTxtError, InvalidInput
from imgtxt.logs import add_logging_flags, setup_logging
from imgtxt.retrieval_metrics import format_metrics
from imgtxt.supervisor import REPO_ROOT, run_services
from indexer.pipeline import IndexConfig, run_index
from indexer.reader import read_records, source_fingerprint
from indexer.shard_checkpoint import checkpoint_path
from indexer.stores.base import CollectionConfig, VectorStore
from indexer.stores.factory import open_store
from search.searcher import Searcher

QUICK_LIMIT = 100
TEXT_QUERIES = (
    "a dog runs through the grass",
    "two children playing in the water",
    "a man riding a bike on a dirt road",
    "people standing on a snowy mountain",
)
NO_DATA = """no data set found at {path}.
The demo trains its model on Flickr8k (or any Karpathy-style dataset_*.json with images/ beside it).
Either put it at ../shared/data/flickr8k (or set IMGTXT_DATA / pass --data DIR),
or pass --bundle BUNDLE to use an already exported model bundle (the val images still come from --data)."""


def build_parser() -> argparse.ArgumentParser:
    """Flags of `imgtxt demo`."""
    p = argparse.ArgumentParser(
        prog="imgtxt demo",
        description="End to end: get a bundle (train + export once, cached), start both encoder services, index the "
        "val split into the embedded Qdrant, run example text and image queries, report R@K through the index.",
    )
    p.add_argument("--data", type=Path, default=default_data_root(), help="dataset directory or dataset_*.json")
    p.add_argument("--bundle", type=Path, help="use this bundle instead of training one")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="cache of the run, bundle and index")
    p.add_argument("--store", help="vector store (default: <artifacts>/qdrant, embedded)")
    p.add_argument("--limit", type=positive_int, help="index only the first N val images")
    p.add_argument("--quick", action="store_true", help=f"same as --limit {QUICK_LIMIT}")
    p.add_argument("--batch-size", type=positive_int, default=32, help="records per indexing batch")
    p.add_argument("--service-timeout", type=float, default=300.0, help="seconds to wait for the services")
    add_logging_flags(p)
    apply_env_defaults(p)
    return p


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _run(cmd: list[str]) -> None:
    print("$ imgtxt " + " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, cwd=REPO_ROOT, check=True)


def ensure_bundle(data: Path, artifacts: Path) -> Path:
    """The cached demo bundle, training (`imgtxt train --recipe quick`) and exporting it first when missing."""
    bundle = artifacts / "demo" / "bundle"
    if (bundle / "manifest.json").is_file():
        print(f"reusing the cached bundle {bundle}")
        return bundle
    run = artifacts / "demo" / "run"
    base = [sys.executable, "-m", "imgtxt.cli"]
    if not (run / "checkpoints" / "best.pt").is_file():
        resume = ["--resume"] if (run / "checkpoints" / "last.pt").is_file() else []
        _run([*base, "train", "--recipe", "quick", "--data", str(data), "--out", str(run), *resume])
    _run([*base, "export", "--run", str(run), "--out", str(bundle)])
    return bundle


def _index(
    store: VectorStore,
    encoder: ServiceEncoder,
    bundle: Path,
    data: Path,
    limit: int | None,
    args: argparse.Namespace,
    store_dir: Path,
) -> None:
    b = load_bundle(bundle, verify=False)
    collection = b.version
    cp = checkpoint_path(store_dir / "_checkpoints", collection, 0, 1)
    job = {
        "source": str(data.resolve()),
        "fingerprint": source_fingerprint(data),
        "split": "val",
        "limit": limit,
        "shard": [0, 1],
    }
    kwargs = {
        "fusion": UnitEncoder(b),
        "config": IndexConfig(batch_size=args.batch_size),
        "checkpoint": cp,
        "job": job,
        "rejects": cp.with_name("rejects-0-of-1.jsonl"),
    }
    records = read_records(data, split="val", limit=limit)
    config = CollectionConfig(dim=encoder.dim)
    try:
        report = run_index(records, encoder, store, collection, config, **kwargs)  # type: ignore[arg-type]
    except InvalidInput:
        # The collection holds another selection of val (e.g. an earlier --limit): rebuild it from scratch.
        store.delete_collection(collection)
        records = read_records(data, split="val", limit=limit)
        report = run_index(records, encoder, store, collection, config, restart=True, **kwargs)  # type: ignore[arg-type]
    per_kind = ", ".join(f"{k} {v}" for k, v in report.indexed.items())
    note = " (already indexed: resumed from the checkpoint)" if report.resumed_from and not report.elapsed_s else ""
    rate = f"{report.elapsed_s:.1f} s, {report.rate:.0f} points/s"
    print(f"indexed {per_kind} into {collection} at {store_dir}{note}; {rate}")


def main(argv: list[str] | None = None) -> int:
    """Runs the demo; 0 on success, 2 when there is no data or bundle to run with, 1 on other errors."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.log_json)
    limit = args.limit or (QUICK_LIMIT if args.quick else None)
    data = args.data
    if not data.exists() or (data.is_dir() and not any(data.glob("dataset_*.json"))):
        print("imgtxt demo: error: " + NO_DATA.format(path=data), file=sys.stderr)
        return 2
    store_dir = Path(args.store) if args.store else args.artifacts / "qdrant"
    started = time.perf_counter()
    try:
        _step("model bundle")
        bundle = args.bundle or ensure_bundle(data, args.artifacts)
        items = load_captioned_images(data, split="val", limit=limit)
        _step("starting the image and text encoder services")
        with run_services(bundle, timeout_s=args.service_timeout) as (image_svc, text_svc):
            print(f"image service on {image_svc.target}, text service on {text_svc.target}: SERVING")
            encoder = ServiceEncoder(image_svc.target, text_svc.target)
            store = open_store(store_dir)
            try:
                _step(f"indexing {len(items)} val images with their captions and image+caption units")
                _index(store, encoder, bundle, data, limit, args, store_dir)
                searcher = Searcher(store, encoder, encoder.bundle_version)
                _step("text -> image queries")
                for query in TEXT_QUERIES:
                    print(f'"{query}"')
                    for h in searcher.search_text(query, target="image", limit=3):
                        print(f"   {h.score:.3f}  {Path(h.payload['image_path']).name}")
                _step("image -> text query")
                print(f"{items[0].path.name} (its own captions include: {items[0].captions[0]!r})")
                for h in searcher.search_image(items[0].path, target="text", limit=3):
                    print(f"   {h.score:.3f}  {h.payload['text']}")
                _step("text -> image+caption units")
                print(f'"{TEXT_QUERIES[0]}"')
                for h in searcher.search_text(TEXT_QUERIES[0], target="unit", limit=3):
                    print(f"   {h.score:.3f}  {Path(h.payload['image_path']).name}: {h.payload['text']}")
                _step(f"R@K through the index ({len(items)} images, {sum(len(i.captions) for i in items)} captions)")
                metrics = evaluate_via_index(
                    items, encoder, store, encoder.bundle_version, CollectionConfig(dim=encoder.dim), reindex=False
                )
                print(format_metrics(metrics))
            finally:
                store.close()
                encoder.close()
            _step("stopping the services")
    except subprocess.CalledProcessError as exc:
        print(
            f"imgtxt demo: error: `{' '.join(map(str, exc.cmd[3:]))}` failed with exit code {exc.returncode}",
            file=sys.stderr,
        )
        return 1
    except (ImgTxtError, ValueError, OSError, RuntimeError, TimeoutError, grpc.RpcError) as exc:
        print(f"imgtxt demo: error: {exc}", file=sys.stderr)
        return 1
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0
