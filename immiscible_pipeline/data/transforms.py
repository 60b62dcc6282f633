"""From a stored image to a training tensor: decoding what a dataset row holds, resize, crop, flip, [-1, 1].

No torchvision: the transforms are a few lines of PIL and numpy. Random choices come from a generator passed
with each image, never from the global RNG.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

CHANNEL_MODES = {1: "L", 3: "RGB"}


def to_pil(value) -> Image.Image:
    """A PIL image from what a dataset row holds: a PIL image, an undecoded {"bytes", "path"} dict, or an
    array / nested list (integers in [0, 255], or floats in [0, 1])."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            import io

            return Image.open(io.BytesIO(value["bytes"]))
        return Image.open(value["path"])
    array = to_uint8(value)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)  # channels first -> last
    return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)


def to_uint8(value) -> np.ndarray:
    """Integers in [0, 255] or floats in [0, 1] as 8-bit values (clipped)."""
    array = np.asarray(value)
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        array = np.rint(array * 255.0)
    return array.clip(0, 255).astype(np.uint8)


class ImageTransform:
    """PIL image -> float tensor [C, R, R] in [-1, 1]: colour mode for `channels` (1 grey, 3 RGB), shorter
    side resized to R (bilinear, antialiased when shrinking), a centre or random R x R crop, and a random
    horizontal flip if asked. Random choices come from the `generator` passed with each image."""

    def __init__(self, resolution: int, channels: int = 3, center_crop: bool = False, random_flip: bool = False):
        if channels not in CHANNEL_MODES:
            raise ValueError(f"images can have 1 (grey) or 3 (RGB) channels, not {channels}")
        if resolution < 1:
            raise ValueError(f"the resolution must be positive, got {resolution}")
        self.resolution, self.channels = resolution, channels
        self.center_crop, self.random_flip = center_crop, random_flip

    @property
    def is_random(self) -> bool:
        return self.random_flip or not self.center_crop

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        return to_tensor(self.pil_image(image, generator))

    def pil_image(self, image: Image.Image, generator: torch.Generator | None = None) -> Image.Image:
        """The transformed image before the conversion to a tensor (8-bit, R x R)."""
        image = image.convert(CHANNEL_MODES[self.channels])
        size = self.resized_size(image.size)
        if size != image.size:
            image = image.resize(size, Image.BILINEAR)
        (left, top), flip = self.random_choices(size, generator)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        return image.transpose(Image.FLIP_LEFT_RIGHT) if flip else image

    def resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) after the resize of the shorter side to R."""
        scale = self.resolution / min(size)
        return max(self.resolution, round(size[0] * scale)), max(self.resolution, round(size[1] * scale))

    def random_choices(self, size: tuple[int, int], generator) -> tuple[tuple[int, int], bool]:
        """The crop's (left, top) in a resized image of `size` and whether to flip, drawn in this order."""
        spare_x, spare_y = size[0] - self.resolution, size[1] - self.resolution
        if self.center_crop:
            offsets = spare_x // 2, spare_y // 2
        else:
            offsets = (int(torch.randint(spare_x + 1, (), generator=generator)),
                       int(torch.randint(spare_y + 1, (), generator=generator)))
        return offsets, bool(self.random_flip and torch.rand((), generator=generator) < 0.5)


def to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """An 8-bit image [H, W] or [H, W, C] -> float tensor [C, H, W] in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy())
