"""Tests of the hierarchical option's local-similarity loss and its lexical labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from trainer.losses import LocalSimilarityLoss, LossInputs, lexical_similarity
from trainer.losses.hierarchical import content_words


def test_content_words_strip_case_punctuation_stop_words_and_plurals() -> None:
    assert content_words("A dog runs on the grass.") == {"dog", "run", "grass"}
    assert content_words("Two DOGS, three puppies and boxes!") == {"two", "dog", "three", "puppy", "box"}
    assert content_words("The man's glass") == {"man", "glass"}  # "ss" is not a plural


def test_lexical_similarity_is_jaccard() -> None:
    sims = lexical_similarity(
        ["A dog runs on the grass.", "a cat", ""],
        ["Two dogs on grass", "A dog runs on the grass", "the of a"],
    )
    # {dog, run, grass} vs {two, dog, grass}: 2 shared of 4 -> .5; identical sets -> 1; empty sets -> 0.
    expected = np.array([[0.5, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(sims, expected)
    assert sims.dtype == np.float32
    assert lexical_similarity([], ["a dog"]).shape == (0, 1)


def _local_inputs(ids: list[int], local_sim: torch.Tensor) -> LossInputs:
    r = 1 / math.sqrt(2)
    dummy = torch.eye(2)
    return LossInputs(
        image=dummy,
        text=dummy,
        image_ids=torch.tensor(ids),
        image_local=torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        text_local=torch.tensor([[1.0, 0.0], [r, r]]),
        local_sim=local_sim,
    )


def test_local_similarity_hand_computed() -> None:
    # S = [[1, a], [0, a]] with a = 1/sqrt2; targets [[1, .2], [.2, 1]].
    # mse = (0 + (a - .2)^2 + .2^2 + (a - 1)^2) / 4.
    # hinge (margin .2): rows: .2 + a - 1 < 0, .2 + 0 - a < 0; columns: text0 .2 + 0 - 1 < 0, text1 .2 + a - a = .2
    # -> 0 + (0 + .2) / 2 = .1.
    a = 1 / math.sqrt(2)
    out = LocalSimilarityLoss(margin=0.2)(_local_inputs([0, 1], torch.tensor([[1.0, 0.2], [0.2, 1.0]])))
    assert_close(out["local_mse"], torch.tensor(((a - 0.2) ** 2 + 0.04 + (a - 1) ** 2) / 4))
    assert_close(out["local_hinge"], torch.tensor(0.1))


def test_local_similarity_same_image_target_is_one() -> None:
    # Same image: off-diagonal targets become 1 whatever the lexical label: ((a - 1)^2 + 1 + (a - 1)^2) / 4,
    # and there are no negatives at all (hinge 0).
    a = 1 / math.sqrt(2)
    out = LocalSimilarityLoss()(_local_inputs([4, 4], torch.tensor([[1.0, 0.2], [0.2, 1.0]])))
    assert_close(out["local_mse"], torch.tensor((2 * (a - 1) ** 2 + 1) / 4))
    assert_close(out["local_hinge"], torch.tensor(0.0))


def test_local_caption_of_same_image_is_not_pushed_away() -> None:
    # Moving text_local 1 onto image_local 0 (keeping its score with image 1): lower loss when both are captions of
    # one image, higher when they are different images with a low lexical label.
    labels = torch.tensor([[1.0, 0.1], [0.1, 1.0]])
    image_local = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    far = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    near = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0]])
    loss = LocalSimilarityLoss()

    def value(ids: list[int], text_local: torch.Tensor) -> torch.Tensor:
        dummy = torch.eye(2)
        inputs = LossInputs(
            dummy, dummy, torch.tensor(ids), image_local=image_local, text_local=text_local, local_sim=labels
        )
        return loss.total(loss(inputs))

    assert value([4, 4], near) < value([4, 4], far)
    assert value([0, 1], near) > value([0, 1], far)


def test_local_embeddings_are_normalised_inside() -> None:
    labels = torch.tensor([[1.0, 0.2], [0.2, 1.0]])
    base = _local_inputs([0, 1], labels)
    assert base.image_local is not None and base.text_local is not None
    scaled = _local_inputs([0, 1], labels)
    scaled.image_local = 3.0 * base.image_local
    scaled.text_local = 0.5 * base.text_local
    loss = LocalSimilarityLoss()
    assert_close(loss(scaled)["local_mse"], loss(base)["local_mse"])


def test_local_similarity_requires_its_inputs() -> None:
    inputs = _local_inputs([0, 1], torch.eye(2))
    inputs.local_sim = None
    with pytest.raises(ValueError, match=r"LossInputs\.local_sim"):
        LocalSimilarityLoss()(inputs)


def test_local_embedding_is_built_from_the_fragments_not_the_pooled_summary() -> None:
    from trainer.model import LocalHead, Projection

    torch.manual_seed(0)
    head = Projection(in_dim=6, dim=4, local_dim=5).eval()
    fragments = torch.randn(2, 7, 6)
    mask = torch.ones(2, 7)
    mask[1, 5:] = 0.0  # the second item has 5 valid fragments (padding after)
    pooled = fragments.mean(1)
    glob, local = head.parts(pooled, fragments, mask)
    assert local is not None and local.shape == (2, 5)
    torch.testing.assert_close(local.norm(dim=-1), torch.ones(2))
    # Order of the fragments does not matter, padding never counts, and one changed fragment changes the local
    # embedding although the pooled summary (and so the global embedding) is the same.
    _, shuffled = head.parts(pooled, fragments[:, torch.randperm(7)], mask)
    torch.testing.assert_close(shuffled[0], local[0])  # type: ignore[index]
    padded = fragments.clone()
    padded[1, 5:] = 100.0
    _, with_padding = head.parts(pooled, padded, mask)
    torch.testing.assert_close(with_padding, local)
    changed = fragments.clone()
    changed[0, 0] += 3.0
    changed[0, 1] -= 3.0  # same mean
    glob_changed, local_changed = head.parts(changed.mean(1), changed, mask)
    torch.testing.assert_close(glob_changed, glob)
    assert not torch.allclose(local_changed[0], local[0])  # type: ignore[index]
    # The served vector is [sqrt(1 - w) global, sqrt(w) local]: unit norm.
    served = head.serve(glob, local)
    assert served.shape == (2, 9)
    torch.testing.assert_close(served.norm(dim=-1), torch.ones(2))
    assert isinstance(head.local, LocalHead)
