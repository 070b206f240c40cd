"""Conversions between numpy arrays and the wire format: packed little-endian float32 rows plus the dimension."""

from __future__ import annotations

import numpy as np

from imgtxt.errors import InvalidInput

WIRE_DTYPE = np.dtype("<f4")


def pack_embeddings(embeddings: np.ndarray) -> bytes:
    """Packs an (N, D) array as row-major little-endian float32 bytes."""
    if embeddings.ndim != 2:
        raise InvalidInput(f"embeddings must be 2-D (N, D), got shape {embeddings.shape}")
    return np.ascontiguousarray(embeddings, dtype=WIRE_DTYPE).tobytes()


def unpack_embeddings(data: bytes, dim: int) -> np.ndarray:
    """Decodes packed float32 bytes into an (N, dim) float32 array without per-float work.

    Raises:
        InvalidInput: When the byte count is not a multiple of `dim` float32 values.
    """
    if dim <= 0:
        raise InvalidInput(f"dim must be positive, got {dim}")
    row = dim * WIRE_DTYPE.itemsize
    if len(data) % row:
        raise InvalidInput(f"embeddings has {len(data)} bytes, not a multiple of dim*4 = {row}")
    return np.frombuffer(data, dtype=WIRE_DTYPE).reshape(-1, dim).astype(np.float32, copy=False)
