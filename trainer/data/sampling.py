"""HREM's neighbour batch sampling: k-means over image embeddings, batches of neighbouring clusters, and their
packing into a fixed number of steps (every image once per epoch, the LR schedule's step count kept)."""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def kmeans(points: Tensor, num_clusters: int, iterations: int = 20, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means with a seeded random initialisation (deterministic for a fixed seed and input).

    Args:
        points: (N, D) float points.
        num_clusters: K (<= N).
        iterations: Maximum Lloyd iterations (stops early when assignments no longer change).
        seed: Seed of the initial centroid choice and of empty-cluster re-seeding.

    Returns:
        (centroids (K, D), assignment (N,) long).
    """
    n = points.shape[0]
    if not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters must be in [1, {n}], got {num_clusters}")
    generator = torch.Generator().manual_seed(seed)
    centroids = points[torch.randperm(n, generator=generator)[:num_clusters].to(points.device)].clone()
    assignment = torch.full((n,), -1, dtype=torch.long, device=points.device)
    chunk = max(1, 2**24 // max(1, num_clusters))  # bounds the (chunk, K) distance block
    for _ in range(iterations):
        new = torch.cat([torch.cdist(points[s : s + chunk], centroids).argmin(dim=1) for s in range(0, n, chunk)])
        if torch.equal(new, assignment):
            break
        assignment = new
        counts = torch.bincount(assignment, minlength=num_clusters)
        sums = points.new_zeros(num_clusters, points.shape[1]).index_add(0, assignment, points)
        empty = counts == 0
        centroids = sums / counts.clamp(min=1).unsqueeze(1).to(points.dtype)
        if empty.any():
            # An empty cluster restarts at a random point, so K clusters survive.
            picks = torch.randint(n, (int(empty.sum()),), generator=generator).to(points.device)
            centroids[empty] = points[picks]
    return centroids, assignment


def neighbour_batches(
    embeddings: np.ndarray | Tensor,
    num_clusters_p: int,
    images_per_cluster_k: int,
    seed: int = 0,
    num_kmeans_clusters: int | None = None,
    iterations: int = 20,
) -> list[list[int]]:
    """HREM's neighbour batch sampling (Fu et al. 2023): batches of semantically neighbouring images.

    Random batches rarely contain related instances, so a batch-level relation module has little to relate and
    in-batch negatives are easy. HREM clusters the images and builds each batch from neighbouring clusters. Here:
    k-means (Lloyd) over the image embeddings; each cluster's members are shuffled and cut into groups of
    ``images_per_cluster_k``; then, repeatedly, the cluster with the most groups left seeds a batch, which takes one
    group from it and one from each of its ``num_clusters_p - 1`` nearest clusters (by centroid distance) that
    still have groups. Batches are returned in a seeded random order.

    Every index 0..N-1 appears in exactly one batch; a batch has at most P * K images (fewer at the tail, when
    clusters run out). Deterministic for a fixed seed and input.

    Args:
        embeddings: (N, D) image embeddings (one row per image).
        num_clusters_p: P, clusters per batch.
        images_per_cluster_k: K, images taken from each cluster.
        seed: Seed of k-means and of the shuffles.
        num_kmeans_clusters: k-means K; default ``max(P, N // (P * K))``, so a cluster holds about P * K images.
        iterations: Lloyd iterations.

    Returns:
        Batches as lists of row indices into ``embeddings``.
    """
    if num_clusters_p < 1 or images_per_cluster_k < 1:
        raise ValueError(
            f"num_clusters_p and images_per_cluster_k must be >= 1, got {num_clusters_p}, {images_per_cluster_k}"
        )
    points = torch.as_tensor(embeddings).detach().to("cpu", torch.float32)
    if points.dim() != 2 or points.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty (N, D) array, got shape {tuple(points.shape)}")
    n = points.shape[0]
    k_clusters = num_kmeans_clusters or max(num_clusters_p, n // (num_clusters_p * images_per_cluster_k))
    k_clusters = min(k_clusters, n)
    centroids, assignment = kmeans(points, k_clusters, iterations=iterations, seed=seed)

    rng = np.random.default_rng(seed)
    groups: list[list[list[int]]] = []
    for cluster in range(k_clusters):
        members = torch.nonzero(assignment == cluster).flatten().tolist()
        rng.shuffle(members)
        cut = [members[s : s + images_per_cluster_k] for s in range(0, len(members), images_per_cluster_k)]
        groups.append(cut[::-1])  # popped from the end, so reverse to take them in order

    batches: list[list[int]] = []
    remaining = np.array([len(g) for g in groups])
    while remaining.sum() > 0:
        seed_cluster = int(np.argmax(remaining))  # ties -> lowest index, deterministic
        # Neighbours per seed rather than a K x K table: memory stays O(K) for large collections.
        by_distance = torch.cdist(centroids[seed_cluster : seed_cluster + 1], centroids)[0].argsort(stable=True)
        order = [seed_cluster] + [c for c in by_distance.tolist() if c != seed_cluster]
        batch: list[int] = []
        taken = 0
        for cluster in order:
            if remaining[cluster] == 0:
                continue
            batch.extend(groups[cluster].pop())
            remaining[cluster] -= 1
            taken += 1
            if taken == num_clusters_p:
                break
        batches.append(batch)
    logger.debug("neighbour_batches: %d images, %d clusters, %d batches", n, k_clusters, len(batches))
    return [batches[i] for i in rng.permutation(len(batches))]


def pack_batches(batches: Sequence[Sequence[int]], num_steps: int) -> list[list[int]]:
    """Packs whole batches into exactly ``num_steps`` steps, so an epoch keeps its step count and drops nothing.

    ``neighbour_batches`` returns more batches than the epoch has steps (clusters run out unevenly, leaving short
    tail batches), and the LR schedule counts a fixed number of steps per epoch. Dropping the surplus would drop
    its images from the epoch; instead the ``num_steps`` largest batches each open a step and every other batch
    joins, whole, the step that holds the fewest units so far (ties: the earliest). A step is thus a union of
    whole neighbour batches (their neighbourhood structure survives), every unit appears exactly once, and step
    sizes stay balanced. Steps come in the order of their opening batch in ``batches`` (which
    ``neighbour_batches`` already shuffles), members in their input order. Deterministic.

    Args:
        batches: Disjoint batches of unit indices, at least ``num_steps`` of them.
        num_steps: Steps of the epoch (>= 1).

    Returns:
        ``num_steps`` lists of unit indices.
    """
    if num_steps < 1 or len(batches) < num_steps:
        raise ValueError(f"cannot pack {len(batches)} batches into {num_steps} steps (need 1 <= steps <= batches)")
    by_size = sorted(range(len(batches)), key=lambda b: (-len(batches[b]), b))
    openers = sorted(by_size[:num_steps])
    members: list[list[int]] = [[b] for b in openers]
    fewest = [(len(batches[b]), step) for step, b in enumerate(openers)]
    heapq.heapify(fewest)
    for b in by_size[num_steps:]:
        size, step = heapq.heappop(fewest)
        members[step].append(b)
        heapq.heappush(fewest, (size + len(batches[b]), step))
    return [[i for b in sorted(group) for i in batches[b]] for group in members]
