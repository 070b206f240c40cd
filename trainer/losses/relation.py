"""HREM: batch-level relation module and loss (training only), plus HREM's neighbour batch sampling."""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.losses.base import NEG_LARGE, EmbeddingLoss, LossInputs, positive_mask, register_loss
from trainer.losses.triplet import Reduction, check_reduction, vsepp_hinge

logger = logging.getLogger(__name__)


class _CrossAttention(nn.Module):
    """Pre-norm residual cross-attention: queries of one modality attend to the other modality's batch."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)

    def forward(self, query: Tensor, context: Tensor, blocked: Tensor) -> Tensor:
        # A query whose every key is blocked would get NaN from softmax(-inf row); it attends to nothing instead.
        isolated = blocked.all(dim=1)
        safe_blocked = blocked & ~isolated.unsqueeze(1)
        kv = self.norm_kv(context).unsqueeze(0)
        out, _ = self.attn(self.norm_q(query).unsqueeze(0), kv, kv, attn_mask=safe_blocked, need_weights=False)
        out = out.squeeze(0).masked_fill(isolated.unsqueeze(1), 0.0)
        return query + out


class RelationModule(nn.Module):
    """HREM's instance-relation module (Fu et al. 2023, "Learning Semantic Relationship among Instances for
    Image-Text Matching", CVPR): the batch is treated as a sequence of instances.

    Intra-modal relations: one transformer-encoder layer per modality (self-attention over the batch's images,
    resp. captions). Inter-modal relations: cross-attention of images to captions and of captions to images.
    Output: L2-normalised enhanced embeddings. It is used only inside the training loss; retrieval serves the
    initial embeddings, so it is never exported.

    Cross-attention never lets an instance attend to the other modality's instances of the *same image*: the
    enhanced image would otherwise contain its own caption and match it trivially, so the relation triplet would
    teach the encoders nothing. (A trace of the own caption can still arrive in two hops, through the intra-modal
    mixing of the other captions; its weight is one attention share among B.)

    Args:
        dim: Embedding size D.
        num_heads: Attention heads (must divide ``dim``).
        ff_mult: Feed-forward width of the encoder layers, as a multiple of ``dim``.
        dropout: Dropout inside the attention and feed-forward blocks.
    """

    def __init__(self, dim: int, num_heads: int = 4, ff_mult: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide dim ({dim})")

        def encoder_layer() -> nn.TransformerEncoderLayer:
            return nn.TransformerEncoderLayer(
                dim, num_heads, dim_feedforward=ff_mult * dim, dropout=dropout, batch_first=True, norm_first=True
            )

        self.image_intra = encoder_layer()
        self.text_intra = encoder_layer()
        self.image_to_text = _CrossAttention(dim, num_heads, dropout)
        self.text_to_image = _CrossAttention(dim, num_heads, dropout)

    def forward(self, image: Tensor, text: Tensor, image_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Enhanced embeddings.

        Args:
            image: (B, D) initial image embeddings.
            text: (B, D) initial caption embeddings.
            image_ids: (B,) image ids; same-id cross-modal pairs are hidden from each other.

        Returns:
            (image, text) enhanced, each (B, D) and L2-normalised.
        """
        image_rel = self.image_intra(image.unsqueeze(0)).squeeze(0)
        text_rel = self.text_intra(text.unsqueeze(0)).squeeze(0)
        blocked = positive_mask(image_ids.to(image.device))
        image_out = self.image_to_text(image_rel, text_rel, blocked)
        text_out = self.text_to_image(text_rel, image_rel, blocked.T)
        return F.normalize(image_out, dim=-1), F.normalize(text_out, dim=-1)


def _masked_log_softmax(logits: Tensor, excluded: Tensor) -> Tensor:
    return F.log_softmax(logits.masked_fill(excluded, NEG_LARGE), dim=1)


def similarity_kl(student: Tensor, teacher: Tensor, pos_mask: Tensor, temperature: float) -> Tensor:
    """Row-wise KL(softmax(teacher / T) || softmax(student / T)), no gradient into ``teacher``; batch mean.

    Same-image off-diagonal columns are removed from both distributions, as from InfoNCE's denominator.
    """
    eye = torch.eye(student.shape[0], dtype=torch.bool, device=student.device)
    excluded = pos_mask & ~eye
    log_p = _masked_log_softmax(teacher.detach() / temperature, excluded)
    log_q = _masked_log_softmax(student / temperature, excluded)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


@register_loss("relation")
class RelationLoss(EmbeddingLoss):
    """HREM training loss (Fu et al. 2023): a VSE++ hinge on the relation-enhanced embeddings plus a consistency
    term that distils the enhanced similarity structure back into the initial (served) embeddings.

    ``relation_triplet``: ``vsepp_hinge`` on ``enhanced_image @ enhanced_text.T`` (hardest negative after
    ``warmup_epochs`` of VSE0, same-image pairs never negatives); trains the relation module and, through it, the
    encoders. ``relation_consistency``: mean of the two directions of
    ``KL(softmax(S_enhanced / T) || softmax(S_initial / T))`` with ``S_enhanced`` detached, so the initial
    embeddings learn the batch-relation-aware ranking without being able to pull the teacher toward them.
    Pair it with a loss on the initial embeddings (e.g. ``vsepp_triplet``) as HREM does.

    Args:
        dim: Embedding size D (builds the ``RelationModule``).
        margin: Hinge margin.
        max_violation: Hardest negative after the warm-up.
        warmup_epochs: VSE0 epochs.
        reduction: ``mean`` or ``sum`` over anchors.
        temperature: Softmax temperature of the consistency distributions.
        consistency_weight: Weight of ``relation_consistency`` relative to ``relation_triplet`` in ``total``.
        num_heads: Attention heads of the relation module.
        dropout: Dropout of the relation module.
        module: A prebuilt relation module (anything mapping (image, text, image_ids) to enhanced (image, text));
            overrides ``dim``, ``num_heads`` and ``dropout``.
    """

    term_names = ("relation_triplet", "relation_consistency")

    def __init__(
        self,
        dim: int = 512,
        margin: float = 0.2,
        max_violation: bool = True,
        warmup_epochs: int = 1,
        reduction: Reduction = "mean",
        temperature: float = 0.05,
        consistency_weight: float = 1.0,
        num_heads: int = 4,
        dropout: float = 0.0,
        module: nn.Module | None = None,
    ) -> None:
        super().__init__()
        check_reduction(reduction)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.relation = module if module is not None else RelationModule(dim, num_heads=num_heads, dropout=dropout)
        self.margin = margin
        self.max_violation = max_violation
        self.warmup_epochs = warmup_epochs
        self.reduction: Reduction = reduction
        self.temperature = temperature
        self.term_weights = {"relation_consistency": consistency_weight}

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        pos = inputs.positive_mask()
        image_enh, text_enh = self.relation(inputs.image, inputs.text, inputs.image_ids)
        enhanced = image_enh @ text_enh.T
        initial = inputs.image @ inputs.text.T
        max_violation = self.max_violation and inputs.epoch >= self.warmup_epochs
        triplet = vsepp_hinge(enhanced, pos, self.margin, max_violation, self.reduction)
        consistency = 0.5 * (
            similarity_kl(initial, enhanced, pos, self.temperature)
            + similarity_kl(initial.T, enhanced.T, pos.T, self.temperature)
        )
        return {"relation_triplet": triplet, "relation_consistency": consistency}


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
