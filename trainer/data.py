"""Training data: caption tables, pixel/token loading through `imgtxt`, and the on-disk cache of frozen activations.

A *source* turns image and caption indices into the inputs of the trainable part of the towers: either activations
cached once from the frozen backbone stages (`CachedSource`), or the frozen stages run on the fly from decoded,
optionally augmented pixels (`PixelSource`). Both use the same `imgtxt.preprocess` functions as serving.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from imgtxt.datasets import CaptionedImage
from imgtxt.preprocess import ImagePreprocessConfig, decode_image, random_resized_crop, resize_image, to_array
from imgtxt.text import TextTokenizer
from trainer.model import DualEncoder, tokenizer_path

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Bumped whenever the cached tensors' meaning changes, so stale caches are never reused."""


def default_cache_dir() -> Path:
    """`$IMGTXT_CACHE`, else ~/.cache/imgtxt."""
    return Path(os.environ.get("IMGTXT_CACHE", Path.home() / ".cache" / "imgtxt"))


@dataclass(frozen=True)
class CaptionTable:
    """A split flattened to one row per caption; captions of one image share its dense image index."""

    images: list[CaptionedImage]
    """The images, indexed 0..N-1."""
    captions: list[str]
    """All captions, image by image."""
    caption_image: np.ndarray
    """(n_captions,) int64 image index of each caption."""

    @classmethod
    def from_images(cls, images: Sequence[CaptionedImage]) -> CaptionTable:
        """Flattens a loaded split (image ids are re-numbered densely in order)."""
        caps: list[str] = []
        owner: list[int] = []
        for i, rec in enumerate(images):
            caps.extend(rec.captions)
            owner.extend([i] * len(rec.captions))
        return cls(list(images), caps, np.asarray(owner, dtype=np.int64))

    def captions_of(self, image_idx: np.ndarray) -> np.ndarray:
        """Indices of all captions of the given images (in the order of `image_idx`)."""
        starts = np.searchsorted(self.caption_image, image_idx, side="left")
        ends = np.searchsorted(self.caption_image, image_idx, side="right")
        return np.concatenate([np.arange(a, b) for a, b in zip(starts, ends, strict=True)]).astype(np.int64)

    def fingerprint(self) -> str:
        """Identity of the split's content (image keys, sizes, mtimes, captions) for cache keys."""
        h = hashlib.sha256()
        for rec in self.images:
            st = rec.path.stat()
            h.update(f"{rec.key}|{rec.path}|{st.st_size}|{int(st.st_mtime)}\n".encode())
        h.update("\n".join(self.captions).encode())
        return h.hexdigest()


def load_pixels(path: Path, cfg: ImagePreprocessConfig, rng: np.random.Generator | None = None) -> np.ndarray:
    """One image file -> (3, H, W) float32 input: the serving transform, or random resized crop + flip when `rng`."""
    img = decode_image(path.read_bytes(), draft_size=cfg.image_size)
    img = random_resized_crop(img, cfg, rng) if rng is not None else resize_image(img, cfg)
    return to_array(img, cfg)


def tokenize(model: DualEncoder, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Captions -> (input_ids, attention_mask) int64 tensors, padded to the longest caption."""
    batch = _tokenizer(model).encode(list(captions))
    return torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)


_TOKENIZERS: dict[int, TextTokenizer] = {}


def _tokenizer(model: DualEncoder) -> TextTokenizer:
    key = model.spec.max_tokens
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = TextTokenizer.from_file(tokenizer_path(), model.text_config)
    return _TOKENIZERS[key]


@dataclass
class TowerInputs:
    """Inputs of the trainable part of both towers for one batch."""

    image: Tensor
    """Image activations at the image split point (pixels when the split is 0)."""
    text: Tensor
    """(B, L, H) text hidden states at the text split point."""
    text_mask: Tensor
    """(B, L) attention mask."""

    def to(self, device: torch.device) -> TowerInputs:
        """Moves every tensor (non-blocking) and restores float32 for cached fp16 activations."""
        return TowerInputs(
            self.image.to(device, non_blocking=True).float(),
            self.text.to(device, non_blocking=True).float(),
            self.text_mask.to(device, non_blocking=True),
        )


class PixelSource:
    """Runs the frozen lower stages on the fly from image files and captions (with augmentation when training)."""

    def __init__(
        self,
        model: DualEncoder,
        table: CaptionTable,
        image_split: int,
        text_split: int,
        seed: int = 0,
        preprocess: ImagePreprocessConfig | None = None,
    ):
        """`preprocess`: the image transform (default: the model's serving contract)."""
        self.model, self.table = model, table
        self.image_split, self.text_split = image_split, text_split
        self.rng = np.random.default_rng(seed)
        self.preprocess = preprocess or model.image_preprocess

    def images(self, image_idx: np.ndarray, augment: bool = False, mirror: bool = False) -> Tensor:
        """Image activations at the split point (frozen stages run without gradients); `mirror`: of the mirrored
        evaluation view (flip-averaged validation)."""
        cfg = self.preprocess
        rng = self.rng if augment else None
        pixels = torch.from_numpy(np.stack([load_pixels(self.table.images[i].path, cfg, rng) for i in image_idx]))
        if mirror:
            pixels = pixels.flip(-1)
        with torch.no_grad():
            return self.model.image.features(pixels.to(self._device()), self.image_split)

    def texts(self, caption_idx: np.ndarray) -> tuple[Tensor, Tensor]:
        """Caption hidden states at the split point and their mask."""
        ids, mask = tokenize(self.model, [self.table.captions[c] for c in caption_idx])
        ids, mask = ids.to(self._device()), mask.to(self._device())
        with torch.no_grad():
            return self.model.text.features(ids, mask, self.text_split), mask

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def batch(self, image_idx: np.ndarray, caption_idx: np.ndarray, augment: bool = False) -> TowerInputs:
        """Inputs for the given images and captions."""
        return TowerInputs(self.images(image_idx, augment), *self.texts(caption_idx))


@dataclass
class FeatureStore:
    """Cached frozen activations of one split, in RAM."""

    image: Tensor
    """(n_images, ...) fp16 image activations of the evaluation transform."""
    text: Tensor
    """(n_captions, L_max, H) fp16 hidden states."""
    text_mask: Tensor
    """(n_captions, L_max) int64 mask."""
    sentence: Tensor
    """(n_captions, H) L2-normalised mean-pooled frozen sentence embeddings (pseudo-labels for soft negatives)."""
    image_views: Tensor | None = None
    """(n_views - 1, n_images, ...) fp16 activations of augmented views (random resized crop + flip), or None."""
    image_mirror: Tensor | None = None
    """(n_images, ...) fp16 activations of the mirrored evaluation view (flip-averaged validation), or None."""


class CachedSource:
    """Serves batches from a `FeatureStore`; with augmented views cached, `augment` picks one view per image."""

    def __init__(self, store: FeatureStore, seed: int = 0) -> None:
        self.store = store
        self.rng = np.random.default_rng(seed)

    def images(self, image_idx: np.ndarray, augment: bool = False, mirror: bool = False) -> Tensor:
        """Cached image activations: the evaluation view, (augment) a random one of the cached views each, or
        (mirror) the mirrored evaluation view."""
        if mirror:
            if self.store.image_mirror is None:
                raise ValueError("this feature cache holds no mirrored view (built without mirror=True)")
            return self.store.image_mirror[image_idx]
        views = self.store.image_views
        if not augment or views is None:
            return self.store.image[image_idx]
        pick = self.rng.integers(0, len(views) + 1, size=len(image_idx))  # 0: evaluation view, v: views[v - 1]
        out = self.store.image[image_idx].clone()
        for v in range(1, len(views) + 1):
            rows = np.nonzero(pick == v)[0]
            if len(rows):
                out[rows] = views[v - 1][image_idx[rows]]
        return out

    def texts(self, caption_idx: np.ndarray) -> tuple[Tensor, Tensor]:
        """Cached hidden states, trimmed to the batch's longest caption, and their mask."""
        mask = self.store.text_mask[caption_idx]
        length = int(mask.sum(1).max())
        return self.store.text[caption_idx, :length], mask[:, :length]

    def batch(self, image_idx: np.ndarray, caption_idx: np.ndarray, augment: bool = False) -> TowerInputs:
        """Inputs for the given images and captions."""
        return TowerInputs(self.images(image_idx, augment), *self.texts(caption_idx))


def _state_hash(modules: Sequence[torch.nn.Module]) -> str:
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(
    model: DualEncoder,
    table: CaptionTable,
    image_split: int,
    text_split: int,
    views: int = 1,
    preprocess: ImagePreprocessConfig | None = None,
    mirror: bool = False,
) -> str:
    """Cache file name: backbone names, frozen weights, preprocessing, tokenizer limits, split points, data, views."""
    spec = model.spec
    frozen = [*model.image.stages[:image_split], model.text.embedding, *model.text.layers]
    parts = {
        "format": CACHE_FORMAT,
        "image_backbone": spec.image_backbone,
        "text_backbone": spec.text_backbone,
        "weights": _state_hash(frozen),
        "preprocess": (preprocess or model.image_preprocess).to_dict(),
        "text": model.text_config.to_dict(),
        "splits": [image_split, text_split],
        "data": table.fingerprint(),
    }
    if views > 1:  # absent for one view, so caches written before views existed stay valid
        parts["views"] = views
    if mirror:  # likewise
        parts["mirror"] = True
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
    return f"{spec.image_backbone}-{spec.text_backbone}-i{image_split}-t{text_split}-{digest}.pt"


def view_rng(image_index: int, view: int) -> np.random.Generator:
    """The augmentation generator of one cached view of one image (deterministic: the cache key covers it)."""
    return np.random.default_rng([VIEW_SEED, view, image_index])


VIEW_SEED = 20261123
"""Seed of the cached augmented views (part of the cache format: changing it needs a CACHE_FORMAT bump)."""


@torch.no_grad()
def build_feature_store(
    model: DualEncoder,
    table: CaptionTable,
    image_split: int,
    text_split: int,
    batch_size: int,
    desc: str = "cache",
    views: int = 1,
    preprocess: ImagePreprocessConfig | None = None,
    mirror: bool = False,
) -> FeatureStore:
    """Runs the frozen stages over a whole split (eval mode): the eval transform, plus `views - 1` augmented views,
    plus (`mirror`) the mirrored eval transform.

    `preprocess`: the image transform and side (default: the model's serving contract).
    """
    model.eval()
    preprocess = preprocess or model.image_preprocess
    n_img, n_cap = len(table.images), len(table.captions)
    on_cpu = next(model.parameters()).device.type == "cpu"
    fast = _onnx_image_stages(model, image_split, preprocess.image_size) if on_cpu else None
    device = next(model.parameters()).device

    def frozen(pixels: np.ndarray) -> Tensor:
        if fast is not None:
            return torch.from_numpy(fast(pixels)).half()
        return model.image.features(torch.from_numpy(pixels).to(device), image_split).half().cpu()

    per_view, mirrored = [], []
    for view in range(views):
        images = []
        label = f"{desc} images" + (f" (view {view + 1}/{views})" if views > 1 else "")
        for start in tqdm(range(0, n_img, batch_size), desc=label, unit="batch", leave=False):
            pixels = np.stack([
                load_pixels(table.images[i].path, preprocess, view_rng(i, view) if view else None)
                for i in range(start, min(start + batch_size, n_img))
            ])  # fmt: skip
            images.append(frozen(pixels))
            if mirror and view == 0:  # the mirrored evaluation view, from the same decoded pixels
                mirrored.append(frozen(np.ascontiguousarray(pixels[..., ::-1])))
        per_view.append(torch.cat(images))
    ids, mask = tokenize(model, table.captions)  # padded to the split's longest caption
    text: Tensor | None = None
    sentence: Tensor | None = None
    # Encode captions sorted by length, each batch trimmed to its own longest caption: most captions are far
    # shorter than the longest one, so this does a fraction of the work of padding everything to it.
    order = torch.argsort(mask.sum(1))
    for start in tqdm(range(0, n_cap, batch_size * 4), desc=f"{desc} captions", unit="batch", leave=False):
        rows = order[start : start + batch_size * 4]
        length = int(mask[rows].sum(1).max())
        b_ids, b_mask = ids[rows, :length].to(device), mask[rows, :length].to(device)
        h = model.text.features(b_ids, b_mask, text_split)
        top = h if text_split == model.text.num_stages else model.text.features(b_ids, b_mask, model.text.num_stages)
        m = b_mask.unsqueeze(-1).float()
        sent = torch.nn.functional.normalize((top * m).sum(1) / m.sum(1), dim=-1).cpu()
        if text is None or sentence is None:
            text = torch.zeros((n_cap, ids.shape[1], h.shape[-1]), dtype=torch.float16)
            sentence = torch.zeros((n_cap, sent.shape[-1]), dtype=torch.float32)
        text[rows, :length] = h.half().cpu()
        sentence[rows] = sent
    assert text is not None and sentence is not None
    extra = torch.stack(per_view[1:]) if views > 1 else None
    mirrored_view = torch.cat(mirrored) if mirror else None
    return FeatureStore(per_view[0], text, mask, sentence, image_views=extra, image_mirror=mirrored_view)


def _onnx_image_stages(model: DualEncoder, stop: int, size: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """The frozen image stages [0, stop) for `size`-pixel inputs as an ONNX Runtime CPU session, or None.

    On CPU, ONNX Runtime runs EfficientNet's depthwise convolutions about an order of magnitude faster than PyTorch
    eager (measured on this 2-core machine), which makes the one-off feature cache minutes instead of tens of minutes.
    The graph is checked against torch on random inputs first (cosine >= 0.9999 per row), else torch is used.
    """
    if stop == 0:
        return None
    import tempfile
    import warnings

    import onnxruntime as ort

    class _Lower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.image = model.image

        def forward(self, x: Tensor) -> Tensor:
            return self.image.features(x, stop)

    probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    path = Path(tempfile.mkdtemp(prefix="imgtxt-cache-")) / "lower.onnx"
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Lower().eval(), (probe,), str(path), input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)  # fmt: skip
            expected = _Lower().eval()(probe).flatten(1).numpy()
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        actual = session.run(["y"], {"x": probe.numpy()})[0].reshape(len(probe), -1)
    except Exception as exc:  # any export/runtime problem: fall back to torch, which is always correct
        logger.warning("ONNX Runtime feature caching unavailable (%s); using torch", exc)
        return None
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)  # the session holds the graph in memory
    cos = (expected * actual).sum(1) / (np.linalg.norm(expected, axis=1) * np.linalg.norm(actual, axis=1) + 1e-12)
    if not cos.min() >= 0.9999:
        logger.warning("ONNX Runtime frozen stages disagree with torch (cos %.6f); using torch", cos.min())
        return None
    return lambda pixels: session.run(["y"], {"x": pixels})[0]


def cached_features(
    model: DualEncoder,
    table: CaptionTable,
    image_split: int,
    text_split: int,
    cache_dir: Path,
    batch_size: int,
    desc: str = "cache",
    build: bool = True,
    views: int = 1,
    preprocess: ImagePreprocessConfig | None = None,
    mirror: bool = False,
) -> FeatureStore | None:
    """Loads the split's frozen activations from `cache_dir`, computing and saving them on a miss.

    Args:
        build: Compute on a miss (False: return None, e.g. for non-zero ranks waiting for rank 0).
        views: Image views to cache: the evaluation transform, plus `views - 1` seeded random resized crops + flips.
        preprocess: Image transform and side (default: the model's serving contract).
        mirror: Also cache the mirrored evaluation transform (flip-averaged validation).
    """
    path = cache_dir / cache_key(model, table, image_split, text_split, views, preprocess, mirror)
    if path.is_file():
        logger.info("feature cache hit", extra={"path": str(path)})
        return FeatureStore(**torch.load(path, map_location="cpu", weights_only=True))
    if not build:
        return None
    logger.info("feature cache miss: computing", extra={"path": str(path)})
    store = build_feature_store(model, table, image_split, text_split, batch_size, desc, views, preprocess, mirror)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(vars(store), tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return store
