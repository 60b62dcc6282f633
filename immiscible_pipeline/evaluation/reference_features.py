"""Features of the reference images, computed once per (dataset, feature network, resolution, count) and cached.

The cache keeps the features themselves (not only mean and covariance) because KID needs them; at 2048-d
and 10k images that is 80 MB, at the classifier's 128-d 5 MB.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors.torch import load_file, save_file

from .features import FeatureExtractor
from .reference_images import load_reference_images, ReferenceSpec

REFERENCE_STATS_VERSION = 1  # bump when the preprocessing of reference images changes


def default_cache_dir() -> str:
    """$IMMISCIBLE_CACHE, else ~/.cache/immiscible_pipeline."""
    return os.environ.get("IMMISCIBLE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "immiscible_pipeline")


def reference_key(spec: ReferenceSpec, extractor: FeatureExtractor, resolution: int, channels: int,
                  num_images: int | None, seed: int) -> str:
    blob = json.dumps({"data": spec.identity(), "features": extractor.name, "resolution": resolution,
                       "channels": channels, "num_images": num_images, "seed": seed,
                       "version": REFERENCE_STATS_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def reference_features(spec: ReferenceSpec, extractor: FeatureExtractor, resolution: int, channels: int,
                       num_images: int | None = 10_000, cache_dir: str | None = None, seed: int = 0,
                       batch_size: int = 256) -> tuple[torch.Tensor, dict]:
    """float32 features [N, D] of `num_images` reference images (a seeded subset; None = the whole split),
    and a record {"key", "path", "from_cache", "num_images"}. Loaded from `cache_dir` when computed before."""
    cache_dir = cache_dir or default_cache_dir()
    key = reference_key(spec, extractor, resolution, channels, num_images, seed)
    path = os.path.join(cache_dir, "reference_stats", f"{key}.safetensors")
    if os.path.isfile(path):
        features = load_file(path)["features"]
        return features, {"key": key, "path": path, "from_cache": True, "num_images": len(features)}
    images, _ = load_reference_images(spec, resolution, channels, num_images, seed=seed)
    features = extractor.extract(images, batch_size=batch_size).contiguous()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    metadata = {"dataset": json.dumps(spec.identity()), "features": extractor.name, "resolution": str(resolution),
                "channels": str(channels), "num_images": str(len(features)), "seed": str(seed)}
    save_file({"features": features}, path + ".tmp", metadata=metadata)
    os.replace(path + ".tmp", path)
    return features, {"key": key, "path": path, "from_cache": False, "num_images": len(features)}
