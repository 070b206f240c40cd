"""Collection identity: the bundle that wrote a collection, recorded when it is created, checked by every writer and
reader.

A collection belongs to the one bundle that created it: its vectors live in that bundle's embedding space, so a
writer with another bundle would mix two spaces in one collection, and a reader with another bundle would rank one
space's vectors by another's queries. `BundleIdentity` (in `imgtxt.bundle`, since the encoders report it) says what a
bundle is; this module says what a mismatch is and how it reads.
"""

from __future__ import annotations

from imgtxt.bundle import BundleIdentity
from imgtxt.errors import WrongSpace
from store.base import CollectionConfig, CollectionMismatch, check_congruent

# Key under which a collection records the bundle that created it (sidecar or collection metadata).
IDENTITY_KEY = "bundle"


class BundleMismatch(CollectionMismatch, WrongSpace):
    """A collection belongs to another bundle than the one writing into it or querying it."""


def check_identity(name: str, recorded: BundleIdentity | None, identity: BundleIdentity, role: str) -> None:
    """Raises unless `recorded` (what collection `name` records) is the bundle `identity` describes.

    Args:
        name: The collection (as resolved from an alias), for the message.
        recorded: The identity the collection recorded at creation (None: created before identities were recorded).
        identity: The bundle of the encoder that writes or queries.
        role: `write` or `search`, for the message.

    Raises:
        BundleMismatch: Another bundle (naming both), or no recorded identity.
    """
    if recorded is None:
        raise BundleMismatch(
            f"collection {name!r} records no bundle identity (it was created before collections recorded theirs), "
            f"so it cannot be told whether {identity.describe()} wrote it: rebuild it (imgtxt index ... --recreate)"
        )
    if not recorded.same_space(identity):
        advice = (
            "index into a new collection (the default is the bundle version), or pass --recreate to delete it"
            if role == "write"
            else "serve the bundle that wrote it, or search another collection"
        )
        raise BundleMismatch(
            f"collection {name!r} belongs to {recorded.describe()}, but the {role} uses {identity.describe()}: "
            f"a collection holds one bundle's vectors; {advice}"
        )


def check_reopen(
    name: str,
    existing: CollectionConfig,
    recorded: BundleIdentity | None,
    requested: CollectionConfig,
    identity: BundleIdentity,
) -> None:
    """What a writer checks before writing into an existing collection: dimension, then bundle, then every option.

    Raises:
        DimensionMismatch: Another dimension.
        BundleMismatch: Another bundle (or none recorded).
        CollectionMismatch: Another quantisation or HNSW configuration.
    """
    check_congruent(name, existing, requested, only=("dim",))
    check_identity(name, recorded, identity, "write")
    check_congruent(name, existing, requested)
