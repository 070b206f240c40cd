"""Tests of the pairwise labels the trainer builds for the losses that ask for them (`trainer.labels.PairLabels`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from trainer.data.captions import CaptionTable
from trainer.labels import PairLabels
from trainer.losses import CombinedLoss, lexical_similarity

# Three images with 2, 3 and 1 captions.
_CAPTIONS = [
    "a dog runs on grass",
    "a brown dog in a field",
    "two children play football",
    "kids kick a ball on grass",
    "children playing in a park",
    "a man climbs a rock wall",
]
_TABLE = CaptionTable([], _CAPTIONS, np.array([0, 0, 1, 1, 1, 2]))


def _sentence() -> torch.Tensor:
    return F.normalize(torch.randn(6, 5, generator=torch.Generator().manual_seed(3)), dim=-1)


def test_image_labels_average_each_caption_against_all_captions_of_the_image() -> None:
    sentence = _sentence()
    loss = CombinedLoss({"kendall_rank": 1.0}, {"kendall_rank": {"labels": "image"}})
    labels = PairLabels(loss, _TABLE, sentence)
    rows = np.array([4, 0, 5])  # batch rows: a caption of image 1, of image 0, of image 2
    built = labels(rows, torch.device("cpu"))
    assert set(built) == {"image_text_sim"}
    cos = sentence @ sentence.T
    owners = [[2, 3, 4], [0, 1], [5]]  # captions of each row's image
    expected = torch.stack([cos[own][:, rows].mean(dim=0) for own in owners]).clamp(0, 1)
    assert_close(built["image_text_sim"], expected)
    # [image row, caption column]: not symmetric, unlike the caption-caption labels.
    assert not torch.allclose(built["image_text_sim"], built["image_text_sim"].T)


def test_lexical_image_labels_average_the_jaccard_over_the_image_captions() -> None:
    loss = CombinedLoss({"kendall_rank": 1.0}, {"kendall_rank": {"labels": "lexical"}})
    labels = PairLabels(loss, _TABLE, None)  # lexical labels need no feature cache
    rows = np.array([3, 0, 5])
    built = labels(rows, torch.device("cpu"))["image_lexical_sim"]
    jaccard = torch.from_numpy(lexical_similarity(_CAPTIONS, _CAPTIONS))
    owners = [[2, 3, 4], [0, 1], [5]]
    assert_close(built, torch.stack([jaccard[own][:, rows].mean(dim=0) for own in owners]))
    # "kids kick a ball on grass" shares "grass" with the dog captions, nothing with the climber's.
    assert built[1, 0] > 0 and built[2, 0] == 0
    # The image-level maximum: the caption's best match among the image's captions, for BCLS's labels and its
    # soft negatives alike (a source independent of the text tower, so no feature cache either).
    both = CombinedLoss(
        {"bcls": 1.0}, {"bcls": {"triplet_kwargs": {"labels": "lexical_max"}, "kendall_kwargs": {"labels": "lexical"}}}
    )
    assert both.requires == {"image_lexical_sim", "image_lexical_max_sim"}
    built_max = PairLabels(both, _TABLE, None)(rows, torch.device("cpu"))["image_lexical_max_sim"]
    assert_close(built_max, torch.stack([jaccard[own][:, rows].max(dim=0).values for own in owners]))
    assert (built_max >= built - 1e-6).all()


def test_only_the_labels_some_loss_reads_are_built() -> None:
    sentence = _sentence()
    rows = np.array([0, 2])
    caption = PairLabels(CombinedLoss({"kendall_rank": 1.0}), _TABLE, sentence)
    assert set(caption(rows, torch.device("cpu"))) == {"text_sim"}
    none = PairLabels(CombinedLoss({"infonce": 1.0}), _TABLE, sentence)
    assert none(rows, torch.device("cpu")) == {}


def test_image_labels_without_a_feature_cache_name_the_setting() -> None:
    loss = CombinedLoss({"kendall_rank": 1.0}, {"kendall_rank": {"labels": "image"}})
    with pytest.raises(ValueError, match=r"\['kendall_rank'\] need the caption pseudo-labels .* cache_features=true"):
        PairLabels(loss, _TABLE, None)
