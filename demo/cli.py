"""`imgtxt demo` (the README's first command): bundle -> both services -> index val -> example queries -> R@K."""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from evaluation.via_index import evaluate_via_index
from imgtxt.bundle import load_bundle
from imgtxt.client import ServiceEncoder
from imgtxt.config import apply_env_defaults, non_negative_int, positive_int
from imgtxt.connection import ConnectionConfig
from imgtxt.datasets import default_data_root, load_captioned_images
from imgtxt.encoders.unit import UnitEncoder
from imgtxt.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, ImgTxtError, InvalidInput, exit_code
from imgtxt.flags import HelpFormatter, add_json_flag, emit
from imgtxt.logs import add_logging_flags, setup_logging
from imgtxt.retrieval_metrics import format_metrics
from imgtxt.supervisor import REPO_ROOT, run_services
from indexer import IndexConfig, IndexReport, checkpoint_path, read_records, run_index, source_fingerprint
from search.searcher import Searcher
from store.base import CollectionConfig, CollectionMismatch, VectorStore
from store.factory import open_store
from store.ids import KINDS
from store.options import recreate_collection

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
        formatter_class=HelpFormatter,
    )
    p.add_argument("--data", type=Path, default=default_data_root(), help="dataset directory or dataset_*.json")
    p.add_argument("--bundle", type=Path, help="use this bundle instead of training one")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="cache of the run, bundle and index")
    p.add_argument("--store", help="vector store (default: <artifacts>/qdrant, embedded)")
    p.add_argument("--limit", type=positive_int, help="only the first N records (images) of the val split")
    p.add_argument("--quick", action="store_true", help=f"same as --limit {QUICK_LIMIT}")
    p.add_argument(
        "--batch-size", type=positive_int, default=32, help="records (images with their captions) per encoding batch"
    )
    p.add_argument("--service-timeout", type=float, default=300.0, help="seconds to wait for the services")
    p.add_argument(
        "--serve",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="end by serving the search page over the index until Ctrl-C (--no-serve: run and exit)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address of the search page (with --serve)")
    sec = p.add_argument_group("secured deployment (the services it starts, and its clients of them)")
    sec.add_argument("--tls-cert", type=Path, help="PEM certificate: the encoder services and the page serve TLS only")
    sec.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    sec.add_argument("--tls-ca", type=Path, help="root certificate the clients trust (default: --tls-cert itself)")
    sec.add_argument("--auth-token", help="bearer token the services and the page require (prefer IMGTXT_AUTH_TOKEN)")
    p.add_argument("--http-port", type=non_negative_int, default=8080, help="port of the search page (0: a free one)")
    add_json_flag(p, "the index report, the query hits and R@K")
    add_logging_flags(p)
    apply_env_defaults(p)
    return p


class _Narrator:
    """The demo's human output: on stdout, or on stderr when stdout carries the JSON (`--json -`)."""

    def __init__(self, to_stderr: bool) -> None:
        self.out = sys.stderr if to_stderr else sys.stdout

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def step(self, text: str) -> None:
        self.say(f"\n== {text}")

    def run(self, cmd: list[str]) -> None:
        self.say("$ imgtxt " + " ".join(cmd[3:]))
        subprocess.run(cmd, cwd=REPO_ROOT, check=True, stdout=self.out)


def ensure_bundle(data: Path, artifacts: Path, narrator: _Narrator | None = None) -> Path:
    """The cached demo bundle, training (`imgtxt train --recipe quick`) and exporting it first when missing."""
    n = narrator or _Narrator(False)
    bundle = artifacts / "demo" / "bundle"
    if (bundle / "manifest.json").is_file():
        n.say(f"reusing the cached bundle {bundle}")
        return bundle
    run = artifacts / "demo" / "run"
    base = [sys.executable, "-m", "imgtxt.cli"]
    if not (run / "checkpoints" / "best.pt").is_file():
        resume = ["--resume"] if (run / "checkpoints" / "last.pt").is_file() else []
        n.run([*base, "train", "--recipe", "quick", "--data", str(data), "--out", str(run), *resume])
    n.run([*base, "export", "--run", str(run), "--out", str(bundle)])
    return bundle


def _index(
    store: VectorStore,
    encoder: ServiceEncoder,
    bundle: Path,
    data: Path,
    limit: int | None,
    args: argparse.Namespace,
    store_dir: Path,
    narrator: _Narrator,
) -> IndexReport:
    b = load_bundle(bundle, verify=False)
    collection = b.version
    cp = checkpoint_path(store_dir / "_checkpoints", collection, 0, 1)
    # Units only from a trained unit head: the demo does not opt in to the untrained normalize(v+t) fusion.
    trained_head = b.manifest.serving.unit_provenance == "trained"
    kinds = KINDS if trained_head else ("image", "text")
    fusion = UnitEncoder(b if trained_head else None)
    job = {
        "source": str(data.resolve()),
        "fingerprint": source_fingerprint(data),
        "split": "val",
        "limit": limit,
        "shard": [0, 1],
        "fusion": fusion.kind if "unit" in kinds else None,
    }
    kwargs: dict[str, Any] = {
        "fusion": fusion,
        "config": IndexConfig(kinds=kinds, batch_size=args.batch_size),
        "checkpoint": cp,
        "job": job,
        "rejects": cp.with_name("rejects-0-of-1.jsonl"),
    }
    # The collection follows the bundle's decisions (its trained quantisation).
    config = CollectionConfig(dim=encoder.dim, quantization=b.manifest.serving.quantization)
    try:
        report = run_index(read_records(data, split="val", limit=limit), encoder, store, collection, config, **kwargs)
    except (InvalidInput, CollectionMismatch):
        # The collection holds another selection of val (e.g. an earlier --limit), or was built with other options:
        # it is the demo's own, so rebuild it from scratch (refused while aliases point at it).
        recreate_collection(store, collection)
        records = read_records(data, split="val", limit=limit)
        report = run_index(records, encoder, store, collection, config, restart=True, **kwargs)
    per_kind = ", ".join(f"{k} {v}" for k, v in report.indexed.items())
    note = " (already indexed: resumed from the checkpoint)" if report.resumed_from and not report.elapsed_s else ""
    rate = f"{report.elapsed_s:.1f} s, {report.rate:.0f} points/s"
    narrator.say(f"indexed {per_kind} into {collection} at {store_dir}{note}; {rate}")
    if "unit" not in kinds:
        narrator.say(
            f"bundle {b.version} has no trained unit head: no unit points (`imgtxt index --untrained-fusion` makes "
            "them with normalize(v+t))"
        )
    return report


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Sets environment variables for the block (the services it starts inherit them)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _serve(store: VectorStore, encoder: ServiceEncoder, args: argparse.Namespace, n: _Narrator) -> None:
    """Serves the search page (and its HTTP/gRPC APIs) over the index just built, until Ctrl-C."""
    from search.backend import SearchBackend
    from search_service.server import SearchServerConfig, create_search_server, wait_for_signal

    n.step("search page")
    config = SearchServerConfig(
        host=args.host,
        port=0,
        http_port=args.http_port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        auth_token=args.auth_token,
        drain_delay_s=0.0,  # one local user and no load balancer to move away: Ctrl-C stops at once
    )
    server = create_search_server(config, SearchBackend(store, encoder, encoder.bundle_version))
    n.say(f"open {server.url} to search the index (Ctrl-C to stop)")
    try:
        wait_for_signal()
    finally:
        server.stop(grace=2)


def _absolute_paths(args: argparse.Namespace) -> None:
    """Makes the path flags absolute before they reach a subprocess: the train and export steps run in the
    repository's directory, where a relative `--data data` or `--artifacts art` would name nothing, and the services
    and the narration then name the same files whatever directory the demo was started from."""
    for name in ("data", "bundle", "artifacts", "tls_cert", "tls_key", "tls_ca"):
        value = getattr(args, name)
        if value is not None:
            setattr(args, name, Path(value).expanduser().absolute())


def main(argv: list[str] | None = None) -> int:
    """Runs the demo; 0 on success, else `imgtxt.errors.exit_code`: 2 when there is no data or bundle to run with."""
    args = build_parser().parse_args(argv)
    _absolute_paths(args)
    setup_logging(args.verbose, args.log_json)
    limit = args.limit or (QUICK_LIMIT if args.quick else None)
    data = args.data
    if not data.exists() or (data.is_dir() and not any(data.glob("dataset_*.json"))):
        print("imgtxt demo: error: " + NO_DATA.format(path=data), file=sys.stderr)
        return EXIT_USAGE
    store_dir = Path(args.store) if args.store else args.artifacts / "qdrant"
    started = time.perf_counter()
    n = _Narrator(to_stderr=args.json == "-")
    result: dict[str, Any] = {"store": str(store_dir), "queries": {}}
    try:
        n.step("model bundle")
        if args.bundle is not None:
            load_bundle(args.bundle, verify=False)  # a missing or malformed --bundle: a usage error, before any start
        bundle = args.bundle or ensure_bundle(data, args.artifacts, n)
        items = load_captioned_images(data, split="val", limit=limit)
        n.step("starting the image and text encoder services")
        ca = args.tls_ca or args.tls_cert
        secured = ("--tls-cert", str(args.tls_cert), "--tls-key", str(args.tls_key)) if args.tls_cert else ()
        env_token = {"IMGTXT_AUTH_TOKEN": args.auth_token} if args.auth_token else {}
        with (
            _environ(env_token),  # the token reaches the services through their environment, never their argv
            run_services(bundle, timeout_s=args.service_timeout, extra_args=secured, tls_ca=ca) as (
                image_svc,
                text_svc,
            ),
        ):
            n.say(f"image service on {image_svc.target}, text service on {text_svc.target}: SERVING")
            encoder = ServiceEncoder(
                ConnectionConfig(image_svc.target, tls_ca=ca, token=args.auth_token),
                ConnectionConfig(text_svc.target, tls_ca=ca, token=args.auth_token),
            )
            store = open_store(store_dir)
            try:
                n.step(f"indexing {len(items)} val images with their captions and image+caption units")
                report = _index(store, encoder, bundle, data, limit, args, store_dir, n)
                result["index"] = report.to_dict()
                searcher = Searcher(store, encoder, encoder.bundle_version)
                n.step("text -> image queries")
                for query in TEXT_QUERIES:
                    n.say(f'"{query}"')
                    hits = searcher.search_text(query, target="image", limit=3)
                    result["queries"][f"text->image: {query}"] = [h.to_dict() for h in hits]
                    for h in hits:
                        n.say(f"   {h.score:.3f}  {Path(h.payload['image_path']).name}")
                n.step("image -> text query")
                n.say(f"{items[0].path.name} (its own captions include: {items[0].captions[0]!r})")
                hits = searcher.search_image(items[0].path, target="text", limit=3)
                result["queries"][f"image->text: {items[0].path.name}"] = [h.to_dict() for h in hits]
                for h in hits:
                    n.say(f"   {h.score:.3f}  {h.payload['text']}")
                if report.fusion is not None:
                    n.step(f"text -> image+caption units (fusion: {report.fusion})")
                    n.say(f'"{TEXT_QUERIES[0]}"')
                    hits = searcher.search_text(TEXT_QUERIES[0], target="unit", limit=3)
                    result["queries"][f"text->unit: {TEXT_QUERIES[0]}"] = [h.to_dict() for h in hits]
                    for h in hits:
                        n.say(f"   {h.score:.3f}  {Path(h.payload['image_path']).name}: {h.payload['text']}")
                n.step(f"R@K through the index ({len(items)} images, {sum(len(i.captions) for i in items)} captions)")
                metrics = evaluate_via_index(
                    items,
                    encoder,
                    store,
                    encoder.bundle_version,
                    CollectionConfig(dim=encoder.dim),
                    reindex=False,
                    batch_size=args.batch_size,
                )
                result["metrics"] = metrics
                n.say(format_metrics(metrics))
                if args.serve:
                    _serve(store, encoder, args, n)
            finally:
                store.close()
                encoder.close()
            n.step("stopping the services")
    except subprocess.CalledProcessError as exc:
        print(
            f"imgtxt demo: error: `{' '.join(map(str, exc.cmd[3:]))}` failed with exit code {exc.returncode}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except (ImgTxtError, ValueError, OSError, RuntimeError, TimeoutError, grpc.RpcError) as exc:
        print(f"imgtxt demo: error: {exc}", file=sys.stderr)
        return exit_code(exc)
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    emit(args.json, result, lambda: n.say(f"done in {result['elapsed_s']:.1f} s"))
    return EXIT_OK
