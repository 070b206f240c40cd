"""Per-shard checkpoints: how many records of the shard's stable order are committed, written atomically."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imgtxt.errors import InvalidInput

SCHEMA = 1


@dataclass(frozen=True)
class Checkpoint:
    """What a shard job has committed; written only after the store confirmed (and flushed) the writes."""

    job: dict[str, Any]
    """Identity of the job (collection, source fingerprint, shard, kinds): a checkpoint resumes only the same job."""
    committed_records: int = 0
    """Records of the shard's order whose points are all durable in the store."""
    counts: dict[str, int] = field(default_factory=dict)
    """Running totals: points indexed per kind, skipped, failed."""
    rejects_bytes: int = 0
    """Size of the rejects file at the commit; a resumed job truncates it there, so no reject is listed twice."""
    done: bool = False
    """The shard finished."""
    schema: int = SCHEMA
    """Checkpoint format version."""


def checkpoint_path(directory: Path, collection: str, shard_index: int, num_shards: int) -> Path:
    """`<dir>/<collection>/shard-<i>-of-<n>.json`."""
    return directory / collection / f"shard-{shard_index}-of-{num_shards}.json"


def load_checkpoint(path: Path, job: dict[str, Any]) -> Checkpoint | None:
    """The checkpoint of this job at `path`, or None when there is none.

    Raises:
        InvalidInput: The file belongs to a different job (other input, kinds or collection): resuming would skip
            the wrong records, so the caller must pass `--restart` or another checkpoint directory.
    """
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    cp = Checkpoint(**raw)
    if cp.job != job:
        raise InvalidInput(
            f"checkpoint {path} belongs to another job ({cp.job}, not {job}); "
            "pass --restart to start over, or another --checkpoint-dir"
        )
    return cp


def save_checkpoint(path: Path, cp: Checkpoint) -> None:
    """Writes the checkpoint atomically (temp file, fsync, rename): a kill leaves the old or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(asdict(cp), f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def unfinished_shards(directory: Path, collection: str, num_shards: int) -> list[int]:
    """The shards of a job whose checkpoint is missing or not done (empty when every shard has finished)."""
    pending = []
    for i in range(num_shards):
        path = checkpoint_path(directory, collection, i, num_shards)
        if not path.is_file() or not json.loads(path.read_text()).get("done"):
            pending.append(i)
    return pending
