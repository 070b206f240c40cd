"""Batch composition (caption- or image-major, HREM neighbour batches), one image-tower pass per distinct image,
feature dropout."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from imgtxt.datasets import CaptionedImage
from imgtxt.errors import ConfigError
from trainer.checkpoint import load_checkpoint
from trainer.config import load_config
from trainer.data import (
    CachedSource,
    CaptionTable,
    TowerInputs,
    kmeans,
    load_pixels,
    neighbour_batches,
    pack_batches,
    view_rng,
)
from trainer.encode import encode_images
from trainer.losses import CombinedLoss
from trainer.model import DualEncoder, drop_features
from trainer.train import Trainer, TrainStep


def test_captions_of_returns_every_caption_of_each_image_in_order() -> None:
    sizes = [2, 3, 1, 2]
    table = CaptionTable.from_images(
        [
            CaptionedImage(i, f"k{i}", Path(f"{i}.jpg"), tuple(f"c{i}.{j}" for j in range(n)), "train")
            for i, n in enumerate(sizes)
        ]
    )
    idx = table.captions_of(np.array([2, 0, 3]))
    assert [table.captions[i] for i in idx] == ["c2.0", "c0.0", "c0.1", "c3.0", "c3.1"]
    assert table.caption_image[idx].tolist() == [2, 0, 0, 3, 3]


def test_drop_features_keeps_a_random_subset_of_valid_rows_and_never_empties_a_row() -> None:
    torch.manual_seed(0)
    mask = torch.ones(200, 10)
    mask[:, 7:] = 0.0  # padding
    assert drop_features(mask, 0.0) is mask
    kept = drop_features(mask, 0.5)
    assert torch.all(kept <= mask)  # padding is never switched on
    assert 0.4 < float(kept[:, :7].mean()) < 0.6
    nearly_all = drop_features(mask, 0.999)
    assert torch.all(nearly_all.sum(1) >= 1)


def _tiny_model() -> DualEncoder:
    torch.manual_seed(0)
    cfg = load_config("tiny", None, ["with_unit=false"])
    return DualEncoder(cfg.model).eval()


def test_train_step_runs_each_distinct_image_once_and_matches_the_duplicated_batch() -> None:
    model = _tiny_model()
    step = TrainStep(model, CombinedLoss({"infonce": 1.0, "vsepp_triplet": 1.0}), model.image.num_stages, 2)
    torch.manual_seed(1)
    images = torch.randn(3, 32, 4, 4)  # activations at the top split (pooling input) of 3 distinct images
    text = torch.randn(7, 5, 32)
    mask = torch.ones(7, 5, dtype=torch.long)
    pair_image = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    calls: list[int] = []
    handle = model.image.pool.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    try:
        once = step(TowerInputs(images, text, mask), pair_image, pair_image, 0, {})
        repeated = step(TowerInputs(images[pair_image], text, mask), torch.arange(7), pair_image, 0, {})
    finally:
        handle.remove()
    assert calls == [3, 7]
    for name in once:
        assert once[name].item() == pytest.approx(repeated[name].item(), rel=1e-5)


def _run(data: Path, tmp_path: Path) -> list[str]:
    """Overrides for a tiny run on all of the synthetic data, with its own feature cache."""
    return [f"data={data}", f"cache_dir={tmp_path / 'cache'}", "train_limit=0", "val_limit=0"]


def test_image_sampling_visits_every_caption_with_fewer_steps(synthetic_data: Path, tmp_path: Path) -> None:
    overrides = [*_run(synthetic_data, tmp_path), "sampling=image", "batch_size=4", "epochs=2", "feature_drop=0.2"]
    trainer = Trainer(load_config("tiny", None, overrides), tmp_path / "run").setup()
    assert trainer.steps_per_epoch == len(trainer.train_table.images) // 4  # 16 images, 4 per step
    seen: list[np.ndarray] = []
    original = trainer._train_step

    def spy(shards: list[np.ndarray], epoch: int) -> dict[str, float]:
        seen.append(np.concatenate(shards))
        return original(shards, epoch)

    trainer._train_step = spy  # type: ignore[method-assign]
    trainer.fit()
    first_epoch = np.concatenate(seen[: trainer.steps_per_epoch])
    assert sorted(first_epoch.tolist()) == list(range(len(trainer.train_table.captions)))  # each caption once
    for idx in seen:  # every step holds 4 whole images: all captions of each
        owners = trainer.train_table.caption_image[idx]
        assert len(set(owners.tolist())) == 4 and len(idx) == 4 * 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8]


def test_neighbour_batches_group_nearby_images_and_drop_none(synthetic_data: Path, tmp_path: Path) -> None:
    # P=3 clusters x 1 image: neighbour batches of at most 3 images for a global batch of 4, so there are more
    # batches than the 4 steps of the epoch (dropping the surplus would drop their images).
    overrides = [*_run(synthetic_data, tmp_path), "sampling=image", "batch_size=4", "epochs=2"]
    overrides += ["neighbour_batches_from=2", "neighbour_clusters=3"]
    trainer = Trainer(load_config("tiny", None, overrides), tmp_path / "run").setup()
    assert trainer.steps_per_epoch == len(trainer._epoch_batches(0)) == 4
    # The epoch's steps are HREM neighbour batches of the current image embeddings, packed whole into the step
    # count (the grouping and packing themselves are tested in test_losses_relation).
    n_images = len(trainer.train_table.images)
    emb = encode_images(trainer.model, trainer.train_source, n_images, trainer.image_split, 8, trainer.device)
    found = neighbour_batches(emb, 3, 1, seed=trainer.cfg.run.seed + 1)
    assert len(found) > trainer.steps_per_epoch
    assert [b.tolist() for b in trainer._epoch_batches(1)] == pack_batches(found, trainer.steps_per_epoch)
    seen: list[np.ndarray] = []
    original = trainer._train_step

    def spy(shards: list[np.ndarray], epoch: int) -> dict[str, float]:
        seen.append(np.concatenate(shards))
        return original(shards, epoch)

    trainer._train_step = spy  # type: ignore[method-assign]
    trainer.fit()
    neighbour_epoch = np.concatenate(seen[trainer.steps_per_epoch :])
    assert len(seen) == 2 * trainer.steps_per_epoch
    assert sorted(neighbour_epoch.tolist()) == list(range(len(trainer.train_table.captions)))  # each caption once


def test_epoch_batches_spread_the_remainder_instead_of_dropping_it(synthetic_data: Path, tmp_path: Path) -> None:
    overrides = [*_run(synthetic_data, tmp_path), "sampling=image", "batch_size=3"]
    trainer = Trainer(load_config("tiny", None, overrides), tmp_path / "run").setup()
    batches = trainer._epoch_batches(0)  # 16 images in 16 // 3 = 5 steps
    assert [len(b) for b in batches] == [4, 3, 3, 3, 3]
    assert sorted(np.concatenate(batches).tolist()) == list(range(16))


def test_neighbour_batches_need_image_sampling() -> None:
    with pytest.raises(ConfigError, match="neighbour_batches_from needs sampling=image"):
        load_config("tiny", None, ["neighbour_batches_from=1"])


def test_cached_augmented_views_are_the_shared_augmentation_and_get_picked_per_image(
    synthetic_data: Path, tmp_path: Path
) -> None:
    overrides = [*_run(synthetic_data, tmp_path), "cache_views=3", "image_trainable_stages=1"]
    trainer = Trainer(load_config("tiny", None, overrides), tmp_path / "run").setup()
    source = trainer.train_source
    assert isinstance(source, CachedSource)
    store = source.store
    n = len(trainer.train_table.images)
    assert store.image_views is not None and store.image_views.shape == (2, *store.image.shape)
    assert trainer.val_source.store.image_views is None  # type: ignore[attr-defined]
    # View v of image i is the frozen stages on imgtxt.preprocess's random resized crop + flip drawn by view_rng(i, v).
    model, split = trainer.model, trainer.image_split
    i = 5
    pixels = load_pixels(trainer.train_table.images[i].path, model.image_preprocess, view_rng(i, 2))
    with torch.no_grad():
        expected = model.image.features(torch.from_numpy(pixels)[None], split)[0].half()
    torch.testing.assert_close(store.image_views[1, i], expected, atol=2e-3, rtol=2e-3)
    assert not torch.equal(store.image_views[0], store.image)  # the views differ from the evaluation transform
    idx = np.arange(n)
    assert torch.equal(source.batch(idx, idx, augment=False).image, store.image)  # the evaluation view
    picked = source.batch(idx, idx, augment=True).image  # the trainer's path
    choices = torch.stack([store.image, *store.image_views])  # (3, n, ...)
    which = [next(v for v in range(3) if torch.equal(picked[j], choices[v, j])) for j in range(n)]
    assert len(set(which)) == 3  # 16 images: all three views get picked


@pytest.mark.parametrize("cache_features", [True, False])
def test_training_views_at_train_image_size_while_validation_and_serving_use_image_size(
    synthetic_data: Path, tmp_path: Path, cache_features: bool
) -> None:
    overrides = [*_run(synthetic_data, tmp_path), "cache_views=2", "image_trainable_stages=1", "image_size=48"]
    overrides += ["train_image_size=32", f"cache_features={cache_features}"]
    trainer = Trainer(load_config("tiny", None, overrides), tmp_path / "run").setup()
    model, split = trainer.model, trainer.image_split
    assert model.image_preprocess.image_size == 48  # the served contract (bundle, validation, eval)
    idx = np.arange(3)
    train_act = trainer.train_source.images(idx, augment=True)
    val_act = trainer.val_source.images(idx)
    with torch.no_grad():
        at = {n: model.image.features(torch.zeros(1, 3, n, n), split).shape[1:] for n in (32, 48)}
    assert at[32] != at[48]
    assert train_act.shape[1:] == at[32] and val_act.shape[1:] == at[48]
    if cache_features:  # the training cache's evaluation view is the serving transform at the training side
        pixels = load_pixels(trainer.train_table.images[1].path, replace(model.image_preprocess, image_size=32))
        with torch.no_grad():
            expected = model.image.features(torch.from_numpy(pixels)[None], split)[0].half()
        torch.testing.assert_close(trainer.train_source.store.image[1], expected, atol=2e-3, rtol=2e-3)  # type: ignore[attr-defined]
    best = trainer.fit()
    # The figures returned are the best epoch's, as logged and as kept in best.pt (validated at image_size).
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert best["rsum"] == max(r["rsum"] for r in logged) > 0
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt").metrics["rsum"] == best["rsum"]


def test_length_bucketed_text_pass_equals_the_padded_one() -> None:
    torch.manual_seed(0)
    model = DualEncoder(load_config("tiny", None, ["with_unit=false", "local_dim=8"]).model).eval()
    torch.manual_seed(2)
    lengths = torch.randint(2, 12, (50,))
    mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
    h = torch.randn(50, 12, 32)
    with torch.no_grad():
        padded = model.text.encode_parts(h, mask, 1)
        bucketed = model.text.encode_parts_bucketed(h, mask, 1, bucket=8)
    # global and local (max over the valid tokens only)
    for got, want in zip((bucketed.glob, bucketed.local), (padded.glob, padded.local), strict=True):
        assert got is not None and want is not None
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _blobs(n_per: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.eye(4, 16)[:3] * 5.0
    return np.concatenate([c + 0.1 * rng.standard_normal((n_per, 16)) for c in centres]).astype(np.float32)


def test_kmeans_recovers_separated_blobs() -> None:
    points = torch.from_numpy(_blobs(20))
    _, assignment = kmeans(points, 3, seed=0)
    for block in range(3):
        assert len(set(assignment[block * 20 : (block + 1) * 20].tolist())) == 1
    assert len(set(assignment.tolist())) == 3


def test_neighbour_batches_disjoint_covering_deterministic() -> None:
    embeddings = _blobs(35)  # 105 images
    batches = neighbour_batches(embeddings, num_clusters_p=2, images_per_cluster_k=4, seed=3)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(105))  # every image exactly once: disjoint and covering
    assert all(1 <= len(batch) <= 8 for batch in batches)
    again = neighbour_batches(torch.from_numpy(embeddings), num_clusters_p=2, images_per_cluster_k=4, seed=3)
    assert again == batches
    assert neighbour_batches(embeddings, num_clusters_p=2, images_per_cluster_k=4, seed=4) != batches


def test_neighbour_batches_group_neighbours() -> None:
    # 3 tight blobs, clusters of ~P*K = 8 images: each batch's images come from nearby clusters, so most batches
    # stay within one blob (random batches of 8 from 3 blobs almost never would).
    embeddings = _blobs(40)
    batches = neighbour_batches(embeddings, num_clusters_p=2, images_per_cluster_k=4, seed=0)
    single_blob = sum(len({i // 40 for i in batch}) == 1 for batch in batches)
    assert single_blob >= 0.8 * len(batches)


def test_neighbour_batches_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        neighbour_batches(_blobs(2), num_clusters_p=0, images_per_cluster_k=4, seed=0)


def test_pack_batches_keeps_every_unit_in_whole_batches_and_the_step_count() -> None:
    batches = [[0, 1, 2, 3], [4], [5, 6, 7, 8], [9, 10], [11, 12, 13, 14], [15]]  # 3 full batches, 3 short tails
    packed = pack_batches(batches, 3)
    assert len(packed) == 3
    assert sorted(i for step in packed for i in step) == list(range(16))  # nothing dropped, nothing twice
    # The full batches open the steps; the tails join whole, largest first, each the smallest step so far (ties:
    # the earliest); a step lists its batches in input order.
    assert packed == [[0, 1, 2, 3, 9, 10], [4, 5, 6, 7, 8], [11, 12, 13, 14, 15]]
    assert pack_batches(batches, 6) == batches
    with pytest.raises(ValueError, match="cannot pack"):
        pack_batches(batches, 7)


def test_packed_neighbour_batches_cover_an_epoch_in_balanced_steps() -> None:
    embeddings = _blobs(35)  # 105 images: 13 steps of 8 leave 1 over, and the clusters leave short tails
    batches = neighbour_batches(embeddings, num_clusters_p=2, images_per_cluster_k=4, seed=3)
    assert len(batches) > 13
    packed = pack_batches(batches, 13)
    assert sorted(i for step in packed for i in step) == list(range(105))
    sizes = [len(step) for step in packed]
    assert max(sizes) - min(sizes) <= 2  # balanced (the batches themselves range from 2 to 8 images)
    members = {tuple(b) for b in batches}
    for step in packed:  # a union of whole neighbour batches
        rest = list(step)
        while rest:
            whole = next(b for b in members if tuple(rest[: len(b)]) == b)
            rest = rest[len(whole) :]
