"""Bundle identities for store tests that write vectors without a bundle."""

from __future__ import annotations

import hashlib

from imgtxt.bundle import BundleIdentity


def identity(version: str = "test-bundle", dim: int = 16) -> BundleIdentity:
    """A made-up bundle's identity (its digest derived from the version, so two versions differ in both)."""
    return BundleIdentity(version, hashlib.sha256(version.encode()).hexdigest(), dim, "cosine", "none", "none")
