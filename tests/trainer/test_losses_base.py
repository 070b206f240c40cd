"""Tests of the loss plumbing: LossInputs validation, the registry, CombinedLoss, and gradients of every loss."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from trainer.losses import (
    LOSSES,
    BCLSLoss,
    CombinedLoss,
    EmbeddingLoss,
    InfoNCELoss,
    KendallRankLoss,
    LossInputs,
    RelationLoss,
    build_loss,
    positive_mask,
    register_loss,
)
from trainer.losses.base import _OPTIONAL_FIELDS
from trainer.model import ModelSpec


def _full_inputs(requires_grad: bool = True) -> LossInputs:
    """B=6 rows, D=8, two images with two captions each, every optional field filled."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 3, 3])

    def unit_rows(dim: int = 8) -> torch.Tensor:
        return F.normalize(torch.randn(6, dim, generator=gen), dim=-1).requires_grad_(requires_grad)

    text_sim = torch.rand(6, 6, generator=gen)
    text_sim = (0.5 * (text_sim + text_sim.T)).fill_diagonal_(1.0)
    local_sim = torch.rand(6, 6, generator=gen).fill_diagonal_(1.0)
    image_text_sim = torch.rand(6, 6, generator=gen)
    image_lexical_sim = torch.rand(6, 6, generator=gen)
    image_lexical_max_sim = torch.maximum(image_lexical_sim, torch.rand(6, 6, generator=gen))
    return LossInputs(
        image=unit_rows(),
        text=unit_rows(),
        image_ids=ids,
        epoch=1,
        text_sim=text_sim,
        image_text_sim=image_text_sim,
        image_lexical_sim=image_lexical_sim,
        image_lexical_max_sim=image_lexical_max_sim,
        image_local=unit_rows(4),
        text_local=unit_rows(4),
        local_sim=local_sim,
        unit=unit_rows(),
    )


# Per loss: constructor kwargs and the inputs it must send gradient to.
_CASES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "infonce": ({}, ("image", "text")),
    "vsepp_triplet": ({"margin": 0.5}, ("image", "text")),
    "adaptive_margin_triplet": ({"margin": 0.5}, ("image", "text")),
    "center": ({}, ("image", "text")),
    "concept_center": ({"dim": 8}, ("image", "text")),
    "soft_negative_triplet": ({"margin": 0.5}, ("image", "text")),
    "kendall_rank": ({}, ("image", "text")),
    "bcls": ({"triplet_kwargs": {"margin": 0.5}}, ("image", "text")),
    "relation": ({"dim": 8, "num_heads": 2}, ("image", "text")),
    "quantization": ({"mode": "binary"}, ("image", "text")),
    "unit_hinge": ({"margin": 0.5}, ("image", "text", "unit")),
    "local_similarity": ({}, ("image_local", "text_local")),
}


def test_every_registered_loss_has_a_gradient_case() -> None:
    assert set(_CASES) == set(LOSSES)


@pytest.mark.parametrize("name", sorted(_CASES))
def test_gradients_flow_and_terms_are_named_scalars(name: str) -> None:
    kwargs, grad_fields = _CASES[name]
    loss = build_loss(name, **kwargs)
    inputs = _full_inputs()
    terms = loss(inputs)
    assert tuple(terms) == loss.term_names
    for value in terms.values():
        assert value.dim() == 0 and torch.isfinite(value)
    loss.total(terms).backward()
    for field in grad_fields:
        grad = getattr(inputs, field).grad
        assert grad is not None, f"{name}: no gradient on {field}"
        assert torch.isfinite(grad).all()
        assert grad.abs().sum() > 0, f"{name}: zero gradient on {field}"


def test_loss_inputs_validates_shapes() -> None:
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="image and text"):
        LossInputs(image=x, text=torch.zeros(3, 5), image_ids=torch.arange(3))
    with pytest.raises(ValueError, match="image_ids"):
        LossInputs(image=x, text=x, image_ids=torch.arange(4))
    with pytest.raises(ValueError, match="text_sim"):
        LossInputs(image=x, text=x, image_ids=torch.arange(3), text_sim=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="unit"):
        LossInputs(image=x, text=x, image_ids=torch.arange(3), unit=torch.zeros(2, 4))


def test_missing_optional_input_names_the_field() -> None:
    x = F.normalize(torch.ones(2, 2), dim=-1)
    inputs = LossInputs(image=x, text=x, image_ids=torch.arange(2))
    with pytest.raises(ValueError, match=r"KendallRankLoss requires LossInputs\.text_sim"):
        KendallRankLoss()(inputs)
    with pytest.raises(ValueError, match=r"LossInputs\.unit"):
        build_loss("unit_hinge")(inputs)
    with pytest.raises(ValueError, match=r"LossInputs\.image_local"):
        build_loss("local_similarity")(inputs)


def test_positive_mask_by_image_id() -> None:
    mask = positive_mask(torch.tensor([4, 4, 9]))
    expected = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    assert torch.equal(mask, expected)


def test_build_loss_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown loss 'nope'") as info:
        build_loss("nope")
    for name in ("infonce", "vsepp_triplet", "kendall_rank", "relation", "quantization", "unit_hinge"):
        assert name in str(info.value)


def test_build_loss_passes_kwargs() -> None:
    loss = build_loss("vsepp_triplet", margin=0.3, warmup_epochs=0)
    assert loss.margin == 0.3 and loss.warmup_epochs == 0


def test_combined_loss_is_weighted_sum_of_named_terms() -> None:
    combined = CombinedLoss({"infonce": 0.5, "vsepp_triplet": 2.0, "center": 0.0})
    out = combined(_full_inputs(requires_grad=False))
    assert set(out) == {"infonce", "triplet", "center", "loss"}
    assert_close(out["loss"], 0.5 * out["infonce"] + 2.0 * out["triplet"] + 0.0 * out["center"])


def test_combined_loss_applies_term_weights_inside_a_loss() -> None:
    combined = CombinedLoss({"quantization": 2.0}, {"quantization": {"mode": "binary", "error_weight": 0.25}})
    out = combined(_full_inputs(requires_grad=False))
    # Terms are raw; the per-term weight (0.25) and the loss weight (2) only enter the total.
    assert_close(out["loss"], 2.0 * (out["quant_retrieval"] + 0.25 * out["quant_error"]))


def test_combined_loss_registers_loss_parameters() -> None:
    combined = CombinedLoss({"infonce": 1.0})
    infonce = combined.losses["infonce"]
    assert isinstance(infonce, InfoNCELoss)
    assert any(p is infonce.logit_scale for p in combined.parameters())


@pytest.mark.parametrize(
    ("weights", "kwargs", "message"),
    [
        ({"nope": 1.0}, None, "valid: adaptive_margin_triplet"),
        ({}, None, "at least one loss"),
        ({"infonce": 1.0}, {"center": {}}, "without a weight: center"),
        ({"bcls": 1.0, "kendall_rank": 1.0}, None, "clashes"),
        ({"infonce": -1.0}, None, ">= 0"),
    ],
)
def test_combined_loss_config_errors(
    weights: dict[str, float], kwargs: dict[str, dict[str, Any]] | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        CombinedLoss(weights, kwargs)


_OPTIONAL = _OPTIONAL_FIELDS  # every optional field; _full_inputs sets them all

# Every loss as in _CASES, plus the arguments that change what a loss reads.
_VARIANTS = [(name, kwargs) for name, (kwargs, _) in sorted(_CASES.items())] + [
    ("kendall_rank", {"labels": "image"}),
    ("kendall_rank", {"labels": "lexical"}),
    ("bcls", {"kendall_kwargs": {"labels": "image"}}),
    ("soft_negative_triplet", {"mining": "semi_hard"}),
    ("soft_negative_triplet", {"labels": "lexical_max"}),
    ("kendall_rank", {"labels": "lexical_max"}),
    ("bcls", {"triplet_kwargs": {"labels": "lexical"}, "kendall_kwargs": {"labels": "lexical_max"}}),
    ("vsepp_triplet", {"mining": "distance_weighted"}),
    ("relation", {"dim": 8, "num_heads": 2, "connections": "self"}),
    ("relation", {"dim": 8, "num_heads": 2, "relevance_weight": 1.0}),
]


def _without(inputs: LossInputs, keep: frozenset[str]) -> LossInputs:
    return dataclasses.replace(inputs, **{name: None for name in _OPTIONAL if name not in keep})


@pytest.mark.parametrize(("name", "kwargs"), _VARIANTS)
def test_each_loss_declares_exactly_the_optional_inputs_it_reads(name: str, kwargs: dict[str, Any]) -> None:
    """With only its declared fields a loss runs; without any one of them it refuses, naming the field."""
    loss = build_loss(name, **kwargs)
    inputs = _full_inputs(requires_grad=False)
    needs = loss.needs()
    assert set(loss(_without(inputs, needs))) == set(loss.term_names)
    for field in needs:
        with pytest.raises(ValueError, match=rf"LossInputs\.{field}"):
            loss(_without(inputs, needs - {field}))


def test_image_labels_change_what_the_rank_term_needs() -> None:
    assert build_loss("kendall_rank").needs() == {"text_sim"}
    assert build_loss("kendall_rank", labels="image").needs() == {"image_text_sim"}
    # BCLS's defaults are lexical labels (the tested form); a given part kwarg replaces only its own key.
    assert CombinedLoss({"bcls": 1.0}).requires == {"image_lexical_sim", "image_lexical_max_sim"}
    combined = CombinedLoss({"bcls": 1.0}, {"bcls": {"kendall_kwargs": {"labels": "image"}}})
    assert combined.requires == {"image_lexical_max_sim", "image_text_sim"}
    assert combined.needing("image_text_sim") == ["bcls"]
    bcls = combined.losses["bcls"]
    assert isinstance(bcls, BCLSLoss) and bcls.kendall.min_label_gap == 0.3  # the default gap stays
    earlier = CombinedLoss({"bcls": 1.0}, {"bcls": {"triplet_kwargs": {"labels": "caption"}}})
    assert earlier.requires == {"text_sim", "image_lexical_sim"}
    with pytest.raises(ValueError, match="unknown ranking labels 'images'"):
        build_loss("kendall_rank", labels="images")


def test_combined_loss_collects_what_its_losses_require() -> None:
    combined = CombinedLoss({"infonce": 1.0, "bcls": 1.0, "adaptive_margin_triplet": 1.0, "unit_hinge": 0.0})
    assert combined.requires == {"text_sim", "unit", "image_lexical_sim", "image_lexical_max_sim"}
    assert combined.needing("text_sim") == ["adaptive_margin_triplet"]
    assert combined.needing("image_lexical_sim") == ["bcls"]
    assert CombinedLoss({"infonce": 1.0}).requires == frozenset()


def test_constructor_arguments_from_the_model_yield_to_configured_ones() -> None:
    spec = ModelSpec(image_backbone="tiny", text_backbone="tiny", dim=16, pretrained=False)
    from_model = CombinedLoss({"relation": 1.0}, model=spec).losses["relation"]
    configured = CombinedLoss({"relation": 1.0}, {"relation": {"dim": 8, "num_heads": 2}}, model=spec)
    assert isinstance(from_model, RelationLoss) and from_model.relation.blocks[0].ff[0].in_features == 16
    assert configured.losses["relation"].relation.blocks[0].ff[0].in_features == 8  # type: ignore[union-attr]


def test_after_step_clamps_the_logit_scale() -> None:
    combined = CombinedLoss({"infonce": 1.0, "bcls": 1.0})
    infonce = combined.losses["infonce"]
    assert isinstance(infonce, InfoNCELoss)
    with torch.no_grad():
        infonce.logit_scale.fill_(10.0)
    combined.after_step()
    assert_close(infonce.logit_scale.detach(), torch.tensor(math.log(100.0)))


def test_a_loss_cannot_require_an_input_that_does_not_exist() -> None:
    with pytest.raises(ValueError, match="names no optional LossInputs field: labels"):

        @register_loss("needs_labels")
        class _NeedsLabels(EmbeddingLoss):
            requires = frozenset({"labels"})

    assert "needs_labels" not in LOSSES
