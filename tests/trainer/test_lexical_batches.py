"""Lexical neighbour batches (`data.lexical_neighbours`) on hand-checkable caption sets, and the local-label share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from imgtxt.datasets import CaptionedImage
from imgtxt.errors import ConfigError
from trainer.config import load_config
from trainer.data import CaptionTable
from trainer.data.lexical import LexicalNeighbours, local_label_share
from trainer.train import Trainer, resolve_sampling

# Three pairs of images that share content words within the pair and none across pairs.
CAPTIONS = [
    ("a dog runs on the grass", "a brown dog"),  # {dog, run, grass, brown}
    ("a cat sleeps on a sofa",),  # {cat, sleep, sofa}
    ("two dogs play in the grass",),  # {two, dog, play, grass}
    ("a cat on a red sofa",),  # {cat, red, sofa}
    ("a man rides a bike",),  # {man, ride, bike}
    ("a man on a bike in the street",),  # {man, bike, street}
]
PAIRS = [{0, 2}, {1, 3}, {4, 5}]


def _table(captions: list[tuple[str, ...]]) -> CaptionTable:
    return CaptionTable.from_images(
        [CaptionedImage(i, f"k{i}", Path(f"{i}.jpg"), caps, "train") for i, caps in enumerate(captions)]
    )


def test_jaccard_of_the_images_content_words_hand_computed() -> None:
    lexical = LexicalNeighbours(_table(CAPTIONS), group_size=2)
    sim = lexical.jaccard(0)
    # Image 0's captions together {dog, run, grass, brown} against image 2's {two, dog, play, grass}: 2 / 6.
    np.testing.assert_allclose(sim, [1.0, 0.0, 1 / 3, 0.0, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(lexical.jaccard(1)[3], 2 / 4, rtol=1e-6)  # {cat, sleep, sofa} vs {cat, red, sofa}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_groups_hold_each_image_with_the_images_sharing_its_words(seed: int) -> None:
    groups = LexicalNeighbours(_table(CAPTIONS), group_size=2).groups(seed)
    assert sorted(map(sorted, groups)) == sorted(map(sorted, PAIRS))  # whichever image opens a group


def test_batches_deal_whole_groups_every_image_once_and_repeat_for_a_seed() -> None:
    lexical = LexicalNeighbours(_table(CAPTIONS), group_size=2)
    batches = lexical.batches(num_steps=3, seed=5)
    assert [set(b.tolist()) in PAIRS for b in batches] == [True, True, True]
    assert sorted(np.concatenate(batches).tolist()) == list(range(6))
    assert [b.tolist() for b in lexical.batches(3, seed=5)] == [b.tolist() for b in batches]
    orders = {tuple(tuple(b.tolist()) for b in lexical.batches(3, seed)) for seed in range(6)}
    assert len(orders) > 1  # another seed, another order
    two = lexical.batches(num_steps=2, seed=5)  # 3 groups in 2 steps: sizes within one group of each other
    assert sorted(len(b) for b in two) == [2, 4] and sorted(np.concatenate(two).tolist()) == list(range(6))
    with pytest.raises(ValueError, match="cannot deal 3 groups of 2 images into 4 steps"):
        lexical.batches(num_steps=4, seed=0)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        LexicalNeighbours(_table(CAPTIONS), group_size=1)


def test_local_label_share_hand_computed() -> None:
    table = _table([c[:1] for c in CAPTIONS])  # one caption per image
    # Batch [0, 2]: "a dog runs on the grass" vs "two dogs play in the grass" share {dog, grass} of 5 words: label
    # .4 both ways. Batch [1, 4]: nothing shared. Four other-image pairs, two above 0 (and above .3), mean .2.
    got = local_label_share(table, [np.array([0, 2]), np.array([1, 4])], threshold=0.3)
    assert got["share_above_0"] == pytest.approx(0.5)
    assert got["share_at_threshold"] == pytest.approx(0.5)
    assert got["mean_label"] == pytest.approx(0.2)
    assert got["anchors_with_close_negative"] == pytest.approx(0.5)  # the captions of images 0 and 2
    assert got["mean_nearest_label"] == pytest.approx((0.4 + 0.4 + 0 + 0) / 4)
    lexical = local_label_share(table, LexicalNeighbours(table, 2).batches(3, seed=0))
    assert lexical["anchors_with_close_negative"] == pytest.approx(1.0)  # every caption meets its pair's


def _run(data: Path, tmp_path: Path) -> list[str]:
    return [f"data={data}", f"cache_dir={tmp_path / 'cache'}", "train_limit=0", "val_limit=0"]


def test_trainer_epochs_are_lexical_neighbour_batches(synthetic_data: Path, tmp_path: Path) -> None:
    # Synthetic image i is a square of colour i % 4 and size (i // 4) % 2, so image i and i + 8 have the same
    # captions: groups of 2 are exactly those twins, 2 groups (4 images) per step.
    overrides = [*_run(synthetic_data, tmp_path), "sampling=auto", "batch_size=4", "lexical_neighbours=2"]
    overrides += ["losses={infonce: 1.0}"]
    trainer = Trainer(load_config("tiny", None, overrides), tmp_path / "run").setup()
    assert trainer.cfg.data.sampling == "image"  # auto: lexical neighbour batches are groups of images
    assert trainer.steps_per_epoch == 4
    for epoch in (0, 1):
        batches = trainer._epoch_batches(epoch)
        assert [b.tolist() for b in batches] == [b.tolist() for b in trainer._epoch_batches(epoch)]
        assert sorted(np.concatenate(batches).tolist()) == list(range(16))
        for batch in batches:
            assert sorted(int(i) % 8 for i in batch[::2]) == sorted(int(i) % 8 for i in batch[1::2])
    trainer.fit()  # trains on them


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["lexical_neighbours=1"], "lexical_neighbours must be 0 or in"),
        (["lexical_neighbours=9"], "lexical_neighbours must be 0 or in"),  # the tiny recipe's batch is 8
        (["lexical_neighbours=2", "sampling=caption"], "lexical_neighbours needs sampling=image"),
        (["lexical_neighbours=2", "sampling=image", "neighbour_batches_from=1"], "choose one"),
    ],
)
def test_lexical_neighbours_config_is_checked(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve_sampling(load_config("tiny", None, ["sampling=auto", *overrides]))
