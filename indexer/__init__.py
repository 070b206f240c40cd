"""Bulk indexing of images, captions and image+caption units into a vector store.

The names below are the indexer's public job entry point: the one edge other packages may use (`evaluation
--via-index` and `imgtxt demo` run an indexing job through it). Everything else in `indexer/` is internal.
"""

from indexer.pipeline import IndexConfig, IndexReport, run_index
from indexer.reader import SourceRecord, read_records, source_fingerprint
from indexer.shard_checkpoint import checkpoint_path

__all__ = [
    "IndexConfig",
    "IndexReport",
    "SourceRecord",
    "checkpoint_path",
    "read_records",
    "run_index",
    "source_fingerprint",
]
