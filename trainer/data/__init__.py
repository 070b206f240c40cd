"""Training data: caption tables, tower inputs through `imgtxt`, sources (pixels or cache), feature cache, sampling."""

from trainer.data.cache import (
    FeatureStore,
    build_feature_store,
    cache_key,
    cached_features,
    default_cache_dir,
    view_rng,
)
from trainer.data.captions import CaptionTable
from trainer.data.inputs import TowerInputs, load_pixels, tokenize
from trainer.data.sampling import kmeans, neighbour_batches, pack_batches
from trainer.data.sources import CachedSource, PixelSource, Source

__all__ = [
    "CachedSource",
    "CaptionTable",
    "FeatureStore",
    "PixelSource",
    "Source",
    "TowerInputs",
    "build_feature_store",
    "cache_key",
    "cached_features",
    "default_cache_dir",
    "kmeans",
    "load_pixels",
    "neighbour_batches",
    "pack_batches",
    "tokenize",
    "view_rng",
]
