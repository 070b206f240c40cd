"""The on-disk cache of frozen-backbone activations: key, build (ONNX Runtime where it agrees with torch), load.

A split's frozen activations are computed once and reused by every run with the same backbones, frozen weights,
preprocessing, tokenizer limits, split points and data (`cache_key`). The captions' frozen mean-pooled sentence
embeddings are cached too: the `text_sim` pseudo-labels of the losses that ask for them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from imgtxt.errors import BundleError
from imgtxt.preprocess import ImagePreprocessConfig
from trainer.data.captions import CaptionTable
from trainer.data.inputs import load_pixels, tokenize
from trainer.model import DualEncoder
from trainer.onnx_export import export_onnx

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Bumped whenever the cached tensors' meaning changes, so stale caches are never reused."""

VIEW_SEED = 20261123
"""Seed of the cached augmented views (part of the cache format: changing it needs a CACHE_FORMAT bump)."""


def default_cache_dir() -> Path:
    """`$IMGTXT_CACHE`, else ~/.cache/imgtxt."""
    return Path(os.environ.get("IMGTXT_CACHE", Path.home() / ".cache" / "imgtxt"))


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

    def rows(self, images: slice, captions: slice) -> FeatureStore:
        """The store of a contiguous run of images and their captions (views into this one's tensors, no copy).

        `captions` must be exactly the captions of `images` (stored image by image, so they are contiguous too).
        """
        return FeatureStore(
            self.image[images],
            self.text[captions],
            self.text_mask[captions],
            self.sentence[captions],
            image_views=None if self.image_views is None else self.image_views[:, images],
            image_mirror=None if self.image_mirror is None else self.image_mirror[images],
        )


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
            pixels = np.stack(
                [
                    load_pixels(table.images[i].path, preprocess, view_rng(i, view) if view else None)
                    for i in range(start, min(start + batch_size, n_img))
                ]
            )
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


class _LowerStages(torch.nn.Module):
    """The image tower's stages [0, stop): pixels -> the activations cached at the split point."""

    def __init__(self, model: DualEncoder, stop: int) -> None:
        super().__init__()
        self.image, self.stop = model.image, stop

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.image.features(pixel_values, self.stop)


def _onnx_image_stages(model: DualEncoder, stop: int, size: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """The frozen image stages [0, stop) for `size`-pixel inputs as an ONNX Runtime CPU session, or None.

    On CPU, ONNX Runtime runs EfficientNet's depthwise convolutions about an order of magnitude faster than PyTorch
    eager (measured on this 2-core machine), which makes the one-off feature cache minutes instead of tens of minutes.
    The graph goes through the bundle export's path (`trainer.onnx_export.export_onnx`: checker, then parity against
    torch on random inputs, cosine >= 0.9999 per row); if it fails, torch is used.
    """
    if stop == 0:
        return None
    probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    path = Path(tempfile.mkdtemp(prefix="imgtxt-cache-")) / "lower.onnx"
    try:
        graph = export_onnx(
            _LowerStages(model, stop), {"pixel_values": probe.numpy()}, path, {"pixel_values": {0: "batch"}}, {}
        )
    except BundleError as exc:
        logger.warning("ONNX Runtime frozen stages disagree with torch (%s); using torch", exc)
        return None
    except Exception as exc:  # any export/runtime problem: fall back to torch, which is always correct
        logger.warning("ONNX Runtime feature caching unavailable (%s); using torch", exc)
        return None
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)  # the session holds the graph in memory
    session = graph.session
    return lambda pixels: session.run(["embedding"], {"pixel_values": pixels})[0]


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
