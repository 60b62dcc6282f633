"""Shared fixtures: a tiny image folder and a tiny UNet config. Tests run offline."""

import importlib.util
import json
import os

# Offline before huggingface_hub is imported anywhere: a Hub lookup fails at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


def skip_if_installed(package: str):
    """Marks a test of the error given without an optional package: skipped where that package is installed."""
    return pytest.mark.skipif(importlib.util.find_spec(package) is not None,
                              reason=f"{package} is installed; the test checks the error given without it")


TINY_UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
    "attention_head_dim": 4,
}


def write_images(folder, count: int = 12, seed: int = 0) -> list:
    """Smooth random RGB images of a few sizes (non-square, so crops matter), in two class sub-folders."""
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        width, height = (12, 10) if index % 2 else (10, 14)
        base = rng.integers(0, 256, size=(1, 1, 3))
        ramp = np.linspace(0, 120, width)[None, :, None] + np.linspace(0, 60, height)[:, None, None]
        pixels = ((base + ramp + rng.normal(0, 10, (height, width, 3))) % 256).astype(np.uint8)
        path = folder / f"class_{index % 2}" / f"image_{index:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory):
    """A folder of 12 small PNGs (10x14 and 12x10 px) in class sub-folders `class_0`, `class_1`. Read-only."""
    folder = tmp_path_factory.mktemp("tiny_imagefolder")
    write_images(folder)
    return folder


@pytest.fixture
def tiny_unet_config():
    """A UNet2DModel config for 8 px RGB with a few thousand parameters (a fresh dict per test)."""
    return json.loads(json.dumps(TINY_UNET_CONFIG))


@pytest.fixture(scope="session")
def tiny_unet_config_path(tmp_path_factory):
    """A folder holding TINY_UNET_CONFIG as config.json, for --model_config_name_or_path."""
    folder = tmp_path_factory.mktemp("tiny_unet")
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **TINY_UNET_CONFIG}))
    return folder
