"""The indexing job: read -> encode -> write, three overlapping stages joined by bounded queues, resumable by shard.

Each stage is injected (records iterable, `Encoder`, `VectorStore`) and timed. Memory stays bounded: at most
`queue_depth` batches wait between two stages. The checkpoint records how many records of the shard's stable order
are durable in the store; a killed job restarts after them, and re-writing the few records written after the last
checkpoint is harmless because point ids are deterministic (upserts overwrite).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from imgtxt.encoders.types import EncodeJob, Encoder, EncodeResult
from imgtxt.encoders.unit import UnitEncoder
from imgtxt.stages import stage as stage_of
from indexer.plan import BatchPlan, needs
from indexer.reader import LoadedRecord, SourceRecord, load_record
from indexer.shard_checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from indexer.writer import RejectsFile, build_points
from store.base import CollectionConfig, VectorStore
from store.ids import KINDS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexConfig:
    """Batching, overlap and checkpointing of an indexing job."""

    kinds: tuple[str, ...] = KINDS
    """Kinds of points to write: any of `image`, `text`, `unit`."""
    batch_size: int = 32
    """Records per batch (one batch = one encode job and one upsert)."""
    queue_depth: int = 4
    """Batches buffered between two stages (bounds memory)."""
    checkpoint_every: int = 4
    """Batches between checkpoints (each one flushes the store first)."""
    progress: bool | None = None
    """Show a progress bar (None = only on a terminal)."""

    def __post_init__(self) -> None:
        needs(self.kinds)  # raises ValueError naming the valid kinds
        if self.batch_size <= 0 or self.queue_depth <= 0 or self.checkpoint_every <= 0:
            raise ValueError(
                f"batch_size, queue_depth and checkpoint_every must be positive, got "
                f"{self.batch_size}, {self.queue_depth}, {self.checkpoint_every}"
            )


@dataclass
class IndexReport:
    """What a job did (totals include the work of earlier, interrupted runs of the same shard)."""

    collection: str
    """Collection written."""
    indexed: dict[str, int] = field(default_factory=dict)
    """Points written per kind."""
    skipped: int = 0
    """Items rejected for bad input (unreadable file, undecodable image, empty text)."""
    failed: int = 0
    """Items the encoder failed on (INTERNAL)."""
    records: int = 0
    """Source records of this shard processed."""
    resumed_from: int = 0
    """Records already committed by an earlier run, not redone."""
    elapsed_s: float = 0.0
    """Wall time of this run."""
    rate: float = 0.0
    """Points written per second in this run."""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    """Busy time per stage: read (file I/O), encode (waiting for embeddings), write (upsert, flush, checkpoint)."""
    rejects_file: str | None = None
    """Where rejects are listed; set only when that file exists and lists at least one."""
    created: bool = False
    """This run created the collection (False: it existed and matched the requested options)."""
    collection_config: dict[str, Any] = field(default_factory=dict)
    """The options the collection was created with (dimension, HNSW, quantisation...)."""
    fusion: str | None = None
    """How unit vectors were made (`trained` or `normalize(v+t)`), when the job makes units."""
    alias: str | None = None
    """Alias pointed at the collection after the job (`imgtxt index --alias`)."""
    warnings: list[str] = field(default_factory=list)
    """What the job was told to do differently from the bundle's decisions (e.g. another quantisation)."""

    @property
    def total_indexed(self) -> int:
        """Points written, all kinds."""
        return sum(self.indexed.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "total_indexed": self.total_indexed}


def run_index(
    records: Iterable[SourceRecord],
    encoder: Encoder,
    store: VectorStore,
    collection: str,
    collection_config: CollectionConfig,
    config: IndexConfig = IndexConfig(),
    fusion: UnitEncoder | None = None,
    checkpoint: Path | None = None,
    job: dict[str, Any] | None = None,
    rejects: Path | None = None,
    restart: bool = False,
    total: int | None = None,
) -> IndexReport:
    """Indexes records into `collection`, resuming from `checkpoint` when it holds this job's progress.

    Args:
        records: The shard's records in a stable order (the read stage loads their image bytes).
        encoder: The encode stage.
        store: The write stage's vector store.
        collection: Collection name (one per bundle version).
        collection_config: Creation options; its `dim` must equal the encoder's.
        config: Batching, overlap and checkpointing.
        fusion: Makes unit vectors (default: the `normalize(v + t)` fallback).
        checkpoint: Checkpoint file of this shard (None: no resume).
        job: Identity of the job stored in the checkpoint (source fingerprint, shard, kinds...).
        rejects: JSONL file listing rejected items.
        restart: Ignore an existing checkpoint and start over.
        total: Number of records, for the progress bar.

    Raises:
        DimensionMismatch: The collection exists with another dimension (raised before any write).
        BundleMismatch: Another bundle than the encoder's created the collection (before any write).
        CollectionMismatch: The collection exists with other options (quantisation, HNSW), before any write.
        ValueError: The encoder's dimension differs from the collection config's.
    """
    if encoder.dim != collection_config.dim:
        raise ValueError(f"encoder dimension {encoder.dim} differs from the bundle's {collection_config.dim}")
    fusion = fusion or UnitEncoder(None)
    job_id = {"collection": collection, "kinds": list(config.kinds), **(job or {})}
    cp = None if (restart or checkpoint is None) else load_checkpoint(checkpoint, job_id)
    created = store.ensure_collection(collection, collection_config, encoder.identity)
    report = IndexReport(
        collection,
        created=created,
        collection_config=store.collection_config(collection).to_dict(),
        fusion=fusion.kind if "unit" in config.kinds else None,
    )
    counts: dict[str, int] = dict(cp.counts) if cp else {}
    report.resumed_from = cp.committed_records if cp else 0
    if cp and cp.done:
        logger.info("shard already complete", extra={"checkpoint": str(checkpoint)})
        _fill(report, counts, cp.committed_records)
        report.rejects_file = str(rejects) if _lists(rejects) else None
        return report

    start = time.perf_counter()
    stage = {"read": 0.0, "encode": 0.0, "write": 0.0}
    skip = report.resumed_from

    def read() -> Iterator[BatchPlan]:
        batch: list[LoadedRecord] = []
        pos = 0
        for rec in records:
            pos += 1
            if pos <= skip:
                continue
            t0 = time.perf_counter()
            batch.append(load_record(rec))
            stage["read"] += time.perf_counter() - t0
            if len(batch) >= config.batch_size:
                yield BatchPlan.build(batch, config.kinds, pos)
                batch = []
        if batch:
            yield BatchPlan.build(batch, config.kinds, pos)

    def encode(plans: Iterable[BatchPlan]) -> Iterator[tuple[BatchPlan, EncodeResult, EncodeResult]]:
        sent: deque[BatchPlan] = deque()  # plans whose job the encoder has drawn, in order
        read_error: list[BaseException] = []

        def jobs() -> Iterator[EncodeJob]:
            try:
                for plan in plans:
                    sent.append(plan)
                    yield plan.job
            except BaseException as exc:
                read_error.append(exc)
                raise

        results = encoder.encode_jobs(jobs())
        try:
            while True:
                t0 = time.perf_counter()
                pair = next(results, None)
                stage["encode"] += time.perf_counter() - t0
                if pair is None:
                    return
                yield (sent.popleft(), *pair)
        except BaseException:
            # A gRPC stream whose request iterator raised reports only CANCELLED: the read error is the cause.
            if read_error:
                raise read_error[0] from None
            raise

    rejects_file = RejectsFile(rejects, truncate_to=cp.rejects_bytes if cp else 0)
    committed = report.resumed_from
    extra = {"bundle_version": encoder.bundle_version}
    # Three overlapping stages: reading and encoding each run ahead in their own thread, at most `queue_depth`
    # batches in each queue; this thread writes.
    planned = stage_of("index-read", read(), config.queue_depth)
    encoded = stage_of("index-encode", encode(planned), config.queue_depth)
    bar = tqdm(
        total=total, initial=committed, unit="rec", disable=None if config.progress is None else not config.progress
    )
    try:
        for n, (plan, image_res, text_res) in enumerate(encoded, 1):
            t0 = time.perf_counter()
            points, rejected = build_points(plan, image_res, text_res, fusion, extra)
            store.upsert(collection, points)
            rejects_file.write(rejected)
            for p in points:
                kind = p.payload["kind"]
                counts[kind] = counts.get(kind, 0) + 1
            counts["skipped"] = counts.get("skipped", 0) + sum(not r.failed for r in rejected)
            counts["failed"] = counts.get("failed", 0) + sum(r.failed for r in rejected)
            committed = plan.end
            if n % config.checkpoint_every == 0:
                _commit(store, collection, rejects_file, checkpoint, job_id, committed, counts, done=False)
            stage["write"] += time.perf_counter() - t0
            bar.update(len(plan.records))
            bar.set_postfix(points=sum(v for k, v in counts.items() if k in KINDS), refresh=False)
        t0 = time.perf_counter()
        store.flush(collection)
        store.optimize(collection)
        _commit(store, collection, rejects_file, checkpoint, job_id, committed, counts, done=True)
        stage["write"] += time.perf_counter() - t0
    finally:
        encoded.cancel()
        planned.cancel()
        bar.close()
        rejects_file.close()
    report.rejects_file = str(rejects) if _lists(rejects) else None
    done_now = sum(v for k, v in counts.items() if k in KINDS) - sum(
        v for k, v in (cp.counts if cp else {}).items() if k in KINDS
    )
    report.elapsed_s = time.perf_counter() - start
    report.rate = done_now / report.elapsed_s if report.elapsed_s > 0 else 0.0
    report.stage_seconds = {k: round(v, 3) for k, v in stage.items()}
    _fill(report, counts, committed)
    return report


def _lists(rejects: Path | None) -> bool:
    """Whether a rejects file exists and lists something."""
    return rejects is not None and rejects.is_file() and rejects.stat().st_size > 0


def _fill(report: IndexReport, counts: dict[str, int], committed: int) -> None:
    report.indexed = {k: counts[k] for k in KINDS if k in counts}
    report.skipped = counts.get("skipped", 0)
    report.failed = counts.get("failed", 0)
    report.records = committed


def _commit(
    store: VectorStore,
    collection: str,
    rejects: RejectsFile,
    path: Path | None,
    job: dict[str, Any],
    committed: int,
    counts: dict[str, int],
    done: bool,
) -> None:
    """Flushes the store, then records the progress: the checkpoint never claims more than the store holds."""
    store.flush(collection)
    size = rejects.commit()
    if path is not None:
        save_checkpoint(path, Checkpoint(job, committed, dict(counts), size, done))
