"""Deterministic point ids (uuid5 of an item's kind and source key) and the kinds of points."""

from __future__ import annotations

import uuid

# Fixed forever: changing it would orphan every point already written (re-runs would duplicate instead of overwrite).
POINT_NAMESPACE = uuid.UUID("6f1c8d1e-1f55-5b4e-9a51-3b2f0c7e2a10")
KINDS = ("image", "text", "unit")


def point_id(kind: str, key: str) -> str:
    """The point id of an item: uuid5 of `kind:key` in a fixed namespace, so a re-run overwrites the same point.

    Args:
        kind: `image`, `text` or `unit`.
        key: The item's stable source key.

    Raises:
        ValueError: Unknown kind.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return str(uuid.uuid5(POINT_NAMESPACE, f"{kind}:{key}"))
