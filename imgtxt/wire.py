"""The wire format in one place for servers and clients: packed float32 embeddings, and proto <-> domain results.

Embeddings travel as row-major little-endian float32 bytes plus the dimension (decoding a `repeated float` into
Python lists is slow). Imports no ONNX Runtime: the thin clients use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from imgtxt.encoders.types import EncodeResult, EncoderInfo, ItemCode, ItemOutcome
from imgtxt.errors import InvalidInput
from imgtxt.v1 import encoder_pb2 as pb

if TYPE_CHECKING:  # the clients import this module without ONNX Runtime
    from imgtxt.serving.tuning import BatchingPlan

WIRE_DTYPE = np.dtype("<f4")
# Largest gRPC message a server receives or sends by default; clients use the same default.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


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


def to_response(result: EncodeResult, ids: Sequence[str], bundle_version: str) -> pb.EncodeResponse:
    """Builds the `EncodeResponse` of a batch; `ids` are the request items' ids, echoed back."""
    return pb.EncodeResponse(
        dim=result.dim,
        embeddings=pack_embeddings(result.embeddings),
        results=[
            pb.ItemResult(id=i, code=int(o.code), message=o.message, truncated=o.truncated, num_tokens=o.num_tokens)
            for i, o in zip(ids, result.outcomes, strict=True)
        ],
        bundle_version=bundle_version,
    )


def from_response(response: pb.EncodeResponse, offset: int = 0) -> EncodeResult:
    """Decodes an `EncodeResponse` into numpy embeddings and per-item outcomes.

    Args:
        response: The server's answer to one request.
        offset: Position of the request's first item in the caller's whole input: messages that name an item by its
            position in the request (`item 3: ...`) are renumbered to the caller's positions.
    """
    n = len(response.results)
    if response.dim > 0:
        embeddings = unpack_embeddings(response.embeddings, response.dim)
    else:
        embeddings = np.zeros((n, 0), np.float32)
    outcomes = [
        ItemOutcome(
            code=ItemCode(r.code),
            message=_renumber(r.message, i, offset),
            truncated=r.truncated,
            num_tokens=r.num_tokens,
        )
        for i, r in enumerate(response.results)
    ]
    return EncodeResult(embeddings, outcomes)


def to_info_response(
    info: EncoderInfo, max_batch: int, max_message_bytes: int, batching: BatchingPlan | None = None
) -> pb.InfoResponse:
    """Builds the `InfoResponse` from the encoder's description, the server's request limits and its batching."""
    return pb.InfoResponse(
        modality=info.modality,
        bundle_version=info.bundle_version,
        bundle_sha256=info.bundle_sha256,
        dim=info.dim,
        normalized=info.normalized,
        distance=info.distance,
        execution_provider=info.execution_provider,
        providers=info.providers,
        limits=pb.Limits(max_batch=max_batch, max_message_bytes=max_message_bytes, **info.limits),
        precision=info.precision,
        precision_reason=info.precision_reason,
        batching=batching.mode if batching else "",
        batch_workers=batching.batch_workers if batching else 0,
        intra_op_threads=batching.intra_op_threads if batching else 0,
        batching_reason=batching.reason if batching else "",
    )


def _renumber(message: str, index: int, offset: int) -> str:
    prefix = f"item {index}:"
    if offset and message.startswith(prefix):
        return f"item {index + offset}:{message[len(prefix) :]}"
    return message
