"""Tests of HREM's fragment-level relations: fragment connection scores, the learned relevance and its regulariser."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.testing import assert_close

from trainer import train
from trainer.checkpoint import load_checkpoint
from trainer.config import load_config
from trainer.losses import LossInputs, RelationLoss, RelationModule, relation_fragments
from trainer.losses.base import FRAGMENT_FIELDS
from trainer.losses.relation import connection_mask
from trainer.losses.relation_fragments import Fragments, LearnedRelevance, fragment_scores, relevance_regulariser
from trainer.model import DualEncoder


def _hand_case() -> Fragments:
    """Two images of two cells, two captions of two tokens; caption 1's second token is padding.

    image 0: cells (1, 0), (0, 1); image 1: cells (1, 0), (1, 0).
    caption 0: tokens (1, 0), (0, 1); caption 1: token (0, 1), then a padding token (1, 0) that matches image 1.
    """
    image = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])
    return Fragments(image, text, torch.tensor([[1.0, 1.0], [1.0, 0.0]]))


def test_fragment_scores_hand_computed_with_padding_left_out() -> None:
    # Caption 0 / image 1: word-cell scores [[1, 1], [0, 0]]. Caption -> image: normalised over the tokens per
    # cell they stay, the tokens' best cells are 1 and 0: mean .5. Image -> caption: normalised over the cells per
    # token, token 0 gives (1/sqrt 2, 1/sqrt 2); each cell's best token 1/sqrt 2: mean 1/sqrt 2.
    # Caption 1 (one valid token (0, 1)) / image 0: scores [0, 1]: caption -> image 1; image -> caption
    # cell 0 gets 0, cell 1 gets 1: mean .5. Caption 1 / image 1: every valid score is 0 (the padding token would
    # have matched both cells with 1).
    scores = fragment_scores(_hand_case(), topk=2)
    r = 1 / math.sqrt(2)
    assert_close(scores.t2i, torch.tensor([[1.0, 0.5], [1.0, 0.0]]))  # [caption, image]
    assert_close(scores.i2t, torch.tensor([[1.0, 0.5], [r, 0.0]]))  # [image, caption]
    # Top-2: caption 0's tokens against image 1 score 1 and 0; caption 1 has one valid token, the second is 0.
    assert_close(scores.t2i_topk[0, 1], torch.tensor([1.0, 0.0]))
    assert_close(scores.t2i_topk[1, 0], torch.tensor([1.0, 0.0]))
    assert_close(scores.i2t_topk[1, 0], torch.tensor([r, r]))
    assert scores.i2t_topk.shape == scores.t2i_topk.shape == (2, 2, 2)
    # K above the number of cells and tokens pads with 0.
    assert_close(fragment_scores(_hand_case(), topk=3).i2t_topk[1, 0], torch.tensor([r, r, 0.0]))


def test_fragment_scores_threshold_negative_cosines_with_a_leaky_relu() -> None:
    # One cell (1, 0), one token (-1, 0): cosine -1, leaky ReLU -.1, normalised over one token / one cell: -1.
    frags = Fragments(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[-1.0, 0.0]]]), torch.ones(1, 1))
    scores = fragment_scores(frags, topk=1)
    assert_close(scores.t2i, torch.tensor([[-1.0]]))
    assert_close(scores.i2t, torch.tensor([[-1.0]]))


def test_fragment_scores_in_chunks_equal_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    lengths = torch.tensor([3, 7, 1, 5, 7, 2])
    frags = Fragments(torch.randn(6, 4, 8), torch.randn(6, 9, 8), (torch.arange(9)[None, :] < lengths[:, None]).float())
    whole = fragment_scores(frags, topk=3)
    monkeypatch.setattr(relation_fragments, "_CHUNK_ELEMENTS", 1)  # one caption at a time
    for got, want in zip(fragment_scores(frags, topk=3), whole, strict=True):
        assert_close(got, want)


def test_fragment_connections_follow_the_fragment_scores_by_the_top_fraction_rule() -> None:
    # Global embeddings that disagree with the fragments: by cosine, caption 1 is image 1's; by fragments, both
    # captions match image 0 best and both images caption 0.
    image = torch.eye(2)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scores = fragment_scores(_hand_case(), topk=2)
    connected = ~connection_mask(image, text, fraction=0.5, cross=(scores.i2t, scores.t2i))
    assert connected[:2, 2:].tolist() == [[True, False], [True, False]]  # image rows: caption 0 only
    assert connected[2:, :2].tolist() == [[True, False], [True, False]]  # caption rows: image 0 only
    # Intra-modal connections and self stay those of the global embeddings.
    assert connected.diagonal().all() and not connected[0, 1] and not connected[2, 3]
    by_cosine = ~connection_mask(image, text, fraction=0.5)
    assert by_cosine[1, 3] and by_cosine[3, 1]  # the global cosine connects image 1 and caption 1 instead


def test_relevance_regulariser_hand_computed() -> None:
    # Images (1, 0), (0, 1); both captions (1, 0): guide exp(-d) = [[1, 1], [c, c]], c = exp(-sqrt 2).
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    i2t = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # rows softmax (1/4, 3/4) and uniform
    t2i = torch.zeros(2, 2)  # uniform rows against softmax([1, c]) rows
    c = math.exp(-math.sqrt(2))
    i2t_kl = (0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)) / 2  # guide rows are uniform
    q = torch.softmax(torch.tensor([1.0, c]), dim=0).tolist()
    t2i_kl = 0.5 * math.log(0.5 / q[0]) + 0.5 * math.log(0.5 / q[1])  # both rows alike
    got = relevance_regulariser(i2t, t2i, image, text, sigma=1.0)
    assert got.item() == pytest.approx(i2t_kl + t2i_kl, rel=1e-5)
    # Zero when the relevance equals the guide itself.
    guide = torch.exp(-torch.cdist(image, text))
    assert relevance_regulariser(guide, guide.T, image, text).item() == pytest.approx(0.0, abs=1e-7)


def test_learned_relevance_is_an_mlp_of_the_topk_plus_the_mean_score() -> None:
    scores = fragment_scores(_hand_case(), topk=2)
    learned = LearnedRelevance(topk=2)
    for mlp in (learned.i2t, learned.t2i):
        for param in mlp.parameters():
            torch.nn.init.zeros_(param)
    i2t, t2i = learned(scores)
    assert_close(i2t, scores.i2t)  # a zero MLP leaves HREM's residual: the mean fragment score
    assert_close(t2i, scores.t2i)
    last = learned.i2t[2]
    assert isinstance(last, torch.nn.Linear)
    torch.nn.init.ones_(last.bias)
    assert_close(learned(scores)[0], scores.i2t + 1.0)
    with pytest.raises(ValueError, match="topk"):
        LearnedRelevance(topk=0)


def _batch(requires_grad: bool = True, seed: int = 0) -> tuple[LossInputs, Tensor, Tensor]:
    torch.manual_seed(seed)
    image = F.normalize(torch.randn(6, 8), dim=-1).requires_grad_(requires_grad)
    text = F.normalize(torch.randn(6, 8), dim=-1).requires_grad_(requires_grad)
    image_frags = torch.randn(6, 4, 8).requires_grad_(requires_grad)
    text_frags = torch.randn(6, 5, 8).requires_grad_(requires_grad)
    mask = (torch.arange(5)[None, :] < torch.tensor([5, 3, 2, 5, 4, 1])[:, None]).float()
    inputs = LossInputs(
        image,
        text,
        torch.arange(6),
        epoch=1,
        image_fragments=image_frags,
        text_fragments=text_frags,
        text_fragment_mask=mask,
    )
    return inputs, image_frags, text_frags


def test_learned_relevance_trains_by_the_hinges_and_the_regulariser_but_fragments_get_no_gradient() -> None:
    module = RelationModule(
        dim=8, num_heads=2, dropout=0.0, connections="fragment", relevance="learned", relevance_weight=1
    )
    loss = RelationLoss(module=module)
    inputs, image_frags, text_frags = _batch()
    out = loss(inputs)
    assert out["relation_regulariser"].item() > 0
    assert module.learned is not None
    mlp = list(module.learned.parameters())
    out["relation_triplet"].backward(retain_graph=True)
    # The hinges reach the relevance MLP through the attention logits it biases ...
    grads = [p.grad for p in mlp]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    assert inputs.image.grad is not None and inputs.image.grad.abs().sum() > 0
    # ... and never the fragments: HREM's connections and relevance inputs are detached.
    assert image_frags.grad is None and text_frags.grad is None
    for p in mlp:
        p.grad = None
    inputs.image.grad = None
    out["relation_regulariser"].backward()
    assert sum(float(p.grad.abs().sum()) for p in mlp if p.grad is not None) > 0  # it trains the MLP ...
    assert inputs.image.grad is None or inputs.image.grad.abs().sum() == 0  # ... towards a detached guide
    # The weight in the total is HREM's reg_loss_weight 10 by default.
    assert loss.term_weights["relation_regulariser"] == 10.0


def test_fixed_relevance_returns_a_zero_regulariser_and_needs_no_fragments() -> None:
    inputs, _, _ = _batch(requires_grad=False)
    loss = RelationLoss(dim=8, num_heads=2, relevance_weight=1.0)
    assert loss.needs() == frozenset()
    assert loss(inputs)["relation_regulariser"].item() == 0.0
    for kwargs in ({"connections": "fragment"}, {"relevance": "learned", "relevance_weight": 1.0}):
        assert RelationLoss(dim=8, num_heads=2, **kwargs).needs() == FRAGMENT_FIELDS


def test_fragment_connections_change_the_enhanced_embeddings_and_need_the_fragments() -> None:
    inputs, _, _ = _batch(requires_grad=False)
    frags = Fragments(inputs.image_fragments, inputs.text_fragments, inputs.text_fragment_mask)  # type: ignore[arg-type]
    outs = {}
    for connections in ("similarity", "fragment"):
        torch.manual_seed(1)
        module = RelationModule(dim=8, num_heads=2, dropout=0.0, layer_scale=1.0, connections=connections).eval()
        outs[connections] = module(inputs.image, inputs.text, inputs.image_ids, frags)
    blocked_sim = connection_mask(inputs.image, inputs.text, 0.5)
    scores = fragment_scores(frags)
    blocked_frag = connection_mask(inputs.image, inputs.text, 0.5, cross=(scores.i2t, scores.t2i))
    assert not torch.equal(blocked_sim, blocked_frag)  # the case does exercise a different graph
    assert not torch.allclose(outs["similarity"].image, outs["fragment"].image)
    module = RelationModule(dim=8, num_heads=2, connections="fragment")
    with pytest.raises(ValueError, match="fragments"):
        module(inputs.image, inputs.text, inputs.image_ids)
    loss = RelationLoss(dim=8, num_heads=2, connections="fragment")
    with pytest.raises(ValueError, match="image_fragments"):
        loss(LossInputs(inputs.image, inputs.text, inputs.image_ids, epoch=1))


def test_relevance_choice_is_checked() -> None:
    with pytest.raises(ValueError, match="relevance must be one of"):
        RelationModule(dim=8, num_heads=2, relevance="both")
    with pytest.raises(ValueError, match="relevance_weight > 0"):
        RelationModule(dim=8, num_heads=2, relevance="learned")
    with pytest.raises(ValueError, match="connections"):
        RelationModule(dim=8, num_heads=2, relevance="learned", relevance_weight=1.0, connections="self")


def test_loss_inputs_check_the_fragment_shapes() -> None:
    image, text, ids = torch.zeros(2, 4), torch.zeros(2, 4), torch.arange(2)
    with pytest.raises(ValueError, match="image_fragments must be"):
        LossInputs(image, text, ids, image_fragments=torch.zeros(3, 5, 4))
    with pytest.raises(ValueError, match="together"):
        LossInputs(image, text, ids, text_fragments=torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match="text_fragment_mask must be"):
        LossInputs(image, text, ids, text_fragments=torch.zeros(2, 5, 4), text_fragment_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="share D"):
        LossInputs(
            image,
            text,
            ids,
            image_fragments=torch.zeros(2, 3, 6),
            text_fragments=torch.zeros(2, 5, 4),
            text_fragment_mask=torch.ones(2, 5),
        )


def test_towers_project_fragments_into_the_shared_space_bucketed_or_not() -> None:
    torch.manual_seed(0)
    model = DualEncoder(load_config("tiny", None, ["with_unit=false"]).model).eval()
    pixels = torch.randn(3, 3, 32, 32)
    image = model.image.encode_parts(pixels, 0, fragments=True)
    assert image.fragments is not None and image.fragment_mask is not None
    assert image.fragments.shape[0] == 3 and image.fragments.shape[2] == model.spec.dim
    assert_close(image.fragments.norm(dim=-1), torch.ones(image.fragments.shape[:2]))
    assert image.fragment_mask.eq(1).all()
    assert model.image.encode_parts(pixels, 0).fragments is None  # only when asked
    torch.manual_seed(2)
    lengths = torch.randint(2, 12, (50,))
    mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
    h = torch.randn(50, 12, 32)
    padded = model.text.encode_parts(h, mask, 1, fragments=True)
    bucketed = model.text.encode_parts_bucketed(h, mask, 1, bucket=8, fragments=True)
    assert padded.fragments is not None and bucketed.fragments is not None and bucketed.fragment_mask is not None
    assert_close(bucketed.fragment_mask, mask[:, : bucketed.fragment_mask.shape[1]].float())
    valid = bucketed.fragment_mask.bool()
    assert_close(bucketed.fragments[valid], padded.fragments[:, : valid.shape[1]][valid], atol=1e-5, rtol=1e-5)


def _train(data: Path, out: Path, cache: Path, relation: str) -> list[dict[str, float]]:
    sets = [
        f"cache_dir={cache}",
        "train_limit=0",
        "val_limit=0",
        "losses={vsepp_triplet: 1.0, relation: 1.0}",
        f"loss_kwargs={{relation: {{start_epoch: 0, num_heads: 2, {relation}}}}}",
    ]
    argv = ["--recipe", "tiny", "--data", str(data), "--out", str(out), *(f"--set={s}" for s in sets)]
    assert train.main(argv) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tiny_training_with_fragment_connections_and_the_learned_relevance(
    synthetic_data: Path, tmp_path: Path
) -> None:
    (record,) = _train(synthetic_data, tmp_path / "fragment", tmp_path / "cache", "connections: fragment")
    assert record["train_relation_triplet"] > 0 and record["train_relation_regulariser"] == 0.0
    run = tmp_path / "learned"
    (record,) = _train(
        synthetic_data, run, tmp_path / "cache", "connections: fragment, relevance: learned, relevance_weight: 1.0"
    )
    assert record["train_relation_triplet"] > 0 and record["train_relation_regulariser"] > 0
    # The learned relevance is part of the loss's state, saved with the run (and restored on --resume).
    saved = load_checkpoint(run / "checkpoints" / "last.pt").state["loss"]
    assert {"losses.relation.relation.learned.i2t.0.weight", "losses.relation.relation.learned.t2i.2.bias"} <= set(
        saved
    )
