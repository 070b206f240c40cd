"""Batch composition (caption- or image-major), one image-tower pass per distinct image, and feature dropout."""

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
from trainer.data import CachedSource, CaptionTable, load_pixels, view_rng
from trainer.encode import encode_images
from trainer.losses import CombinedLoss, neighbour_batches, pack_batches
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
    return DualEncoder(cfg.model_spec()).eval()


def test_train_step_runs_each_distinct_image_once_and_matches_the_duplicated_batch() -> None:
    model = _tiny_model()
    step = TrainStep(model, CombinedLoss({"infonce": 1.0, "vsepp_triplet": 1.0}), model.image.num_stages, 2)
    from trainer.data import TowerInputs

    torch.manual_seed(1)
    images = torch.randn(3, 32, 4, 4)  # activations at the top split (pooling input) of 3 distinct images
    text = torch.randn(7, 5, 32)
    mask = torch.ones(7, 5, dtype=torch.long)
    pair_image = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    calls: list[int] = []
    handle = model.image.pool.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    try:
        once = step(TowerInputs(images, text, mask), pair_image, pair_image, 0, None, None)
        repeated = step(TowerInputs(images[pair_image], text, mask), torch.arange(7), pair_image, 0, None, None)
    finally:
        handle.remove()
    assert calls == [3, 7]
    for name in once:
        assert once[name].item() == pytest.approx(repeated[name].item(), rel=1e-5)


def test_image_sampling_visits_every_caption_with_fewer_steps(synthetic_data: Path, tmp_path: Path) -> None:
    overrides = [f"data={synthetic_data}", f"cache_dir={tmp_path / 'cache'}", "train_limit=0", "val_limit=0",
                 "sampling=image", "batch_size=4", "epochs=2", "feature_drop=0.2"]  # fmt: skip
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
    overrides = [f"data={synthetic_data}", f"cache_dir={tmp_path / 'cache'}", "train_limit=0", "val_limit=0",
                 "sampling=image", "batch_size=4", "epochs=2", "neighbour_batches_from=2",
                 "neighbour_clusters=3"]  # fmt: skip
    trainer = Trainer(load_config("tiny", None, overrides), tmp_path / "run").setup()
    assert trainer.steps_per_epoch == len(trainer._epoch_batches(0)) == 4
    # The epoch's steps are HREM neighbour batches of the current image embeddings, packed whole into the step
    # count (the grouping and packing themselves are tested in test_losses_relation).
    emb = encode_images(trainer.model, trainer.train_source, len(trainer.train_table.images), trainer.image_split, 8,
                        trainer.device)  # fmt: skip
    found = neighbour_batches(emb, 3, 1, seed=trainer.cfg.seed + 1)
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
    overrides = [f"data={synthetic_data}", f"cache_dir={tmp_path / 'cache'}", "train_limit=0", "val_limit=0",
                 "sampling=image", "batch_size=3"]  # fmt: skip
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
    overrides = [f"data={synthetic_data}", f"cache_dir={tmp_path / 'cache'}", "train_limit=0", "val_limit=0",
                 "cache_views=3", "image_trainable_stages=1"]  # fmt: skip
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
    overrides = [f"data={synthetic_data}", f"cache_dir={tmp_path / 'cache'}", "train_limit=0", "val_limit=0",
                 "cache_views=2", "image_trainable_stages=1", "image_size=48", "train_image_size=32",
                 f"cache_features={cache_features}"]  # fmt: skip
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
    model = _tiny_model()
    torch.manual_seed(2)
    lengths = torch.randint(2, 12, (50,))
    mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
    h = torch.randn(50, 12, 32)
    with torch.no_grad():
        padded = model.text.pooled_from(h, mask, 1)
        bucketed = model.text.pooled_from_bucketed(h, mask, 1, bucket=8)
    torch.testing.assert_close(bucketed, padded, atol=1e-5, rtol=1e-5)
