"""Training images as seeded, resumable batches.

    train_images = TrainImages(dataset, "image", ImageTransform(32, channels=3, random_flip=True), seed=0)
    # or train_images_for(...): the same, resized once and held in memory if the images are square arrays
    loader = train_dataloader(train_images, batch_size=128)
    for epoch in ...:
        train_images.start_epoch(epoch)       # a new shuffle and new augmentations, both fixed by (seed, epoch)

Randomness never comes from the global RNG: the shuffle of an epoch comes from (seed, epoch) and each
sample's crop and flip from (seed, epoch, index). So the images a step sees do not depend on data-loader
workers, on prefetching, or on whether the run was resumed from a checkpoint, and the global torch RNG is
left to the training loop (noise, timesteps), where `accelerate.save_state` keeps it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .sources import check_column
from .transforms import ImageTransform, to_pil, to_tensor, to_uint8


def sample_seed(*numbers: int) -> int:
    """A well-mixed 64-bit seed from non-negative integers (e.g. seed, epoch, index)."""
    return int(np.random.SeedSequence([int(n) % 2**32 for n in numbers]).generate_state(1, np.uint64)[0])


class TrainImages(torch.utils.data.Dataset):
    """Rows of a dataset as {"pixel_values": tensor, ...}, with augmentations fixed by (seed, epoch, index).

    Args:
        dataset: a `datasets.Dataset` (or anything indexable whose rows are dicts, with `column_names`).
        image_column: the column holding the images (checked).
        transform: an `ImageTransform` (or any callable (PIL image, generator) -> tensor).
        seed: fixes the shuffle and the augmentations of every epoch.
        keep_columns: other columns passed through unchanged (labels, captions), each checked.
    An image that cannot be decoded raises a ValueError naming its file (or its row).
    """

    def __init__(self, dataset, image_column: str, transform, seed: int = 0, keep_columns: Sequence[str] = ()):
        check_column(dataset, image_column, "--image_column")
        for column in keep_columns:
            check_column(dataset, column, "column")
        feature = getattr(dataset, "features", {}).get(image_column)
        if type(feature).__name__ == "Image" and getattr(feature, "decode", False):
            import datasets  # decode ourselves, so that a broken file can be named

            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset, self.image_column, self.transform = dataset, image_column, transform
        self.seed, self.keep_columns, self.epoch = seed, tuple(keep_columns), 0

    def __len__(self) -> int:
        return len(self.dataset)

    def start_epoch(self, epoch: int) -> None:
        """Selects the epoch's shuffle and augmentations. Deliberately not named `set_epoch`: Accelerate's
        data loader calls a dataset's `set_epoch` with its own count of passes, which restarts at 0 when a
        run resumes from a checkpoint, and would then replay the first epoch."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        return self._item(index, self.dataset[index])

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A batch's rows in one read (the DataLoader uses this): several times faster than row by row."""
        if not hasattr(self.dataset, "column_names") or not hasattr(self.dataset, "select"):
            return [self[index] for index in indices]
        columns = self.dataset[list(indices)]  # a datasets.Dataset returns {column: [values]}
        return [self._item(index, {name: values[i] for name, values in columns.items()})
                for i, index in enumerate(indices)]

    def _item(self, index: int, row: dict) -> dict:
        value = row[self.image_column]
        try:
            image = to_pil(value)
            image.load()
        except Exception as error:
            where = value.get("path") if isinstance(value, dict) and value.get("path") else f"row {index}"
            raise ValueError(f"cannot read the image {where} (column {self.image_column!r}): {error}") from error
        generator = None
        if getattr(self.transform, "is_random", True):
            generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
        item = {"pixel_values": self.transform(image, generator)}
        item.update((column, row[column]) for column in self.keep_columns)
        return item


ARRAY_FEATURES = ("Array2D", "Array3D")  # datasets' fixed-shape arrays (the bundled MNIST is Array2D)
PREPARED_BYTES_LIMIT = 2**30  # larger datasets stay on disk and are resized per step


class PreparedTrainImages(TrainImages):
    """`TrainImages` for square images stored as fixed-shape arrays (datasets' Array2D / Array3D, as in the
    bundled MNIST): every image is resized once, up front, and kept in memory as 8-bit pixels, so that a batch
    costs a few array reads instead of a PIL conversion and resize per image (for the MNIST demo, a tenth of
    each step). The tensors are exactly those of `TrainImages` with the same transform and seed: a square
    image resizes to R x R, which leaves the crop no freedom, and a flip is drawn as `TrainImages` draws it."""

    CHUNK = 4096  # rows read from Arrow at a time

    def __init__(self, dataset, image_column: str, transform: ImageTransform, seed: int = 0,
                 keep_columns: Sequence[str] = ()):
        super().__init__(dataset, image_column, transform, seed, keep_columns)
        if not self.suits(dataset, image_column):
            raise ValueError(f"column {image_column!r} does not hold square arrays of one shape: use TrainImages")
        from tqdm.auto import tqdm

        fixed = ImageTransform(transform.resolution, transform.channels, center_crop=True)  # flips come later
        arrays = dataset.with_format("numpy", columns=[image_column])
        self.pixels = np.stack([np.asarray(fixed.pil_image(to_pil(value)))
                                for start in tqdm(range(0, len(dataset), self.CHUNK), desc="resizing the images",
                                                  unit="chunk", disable=len(dataset) <= 100_000)
                                for value in to_uint8(arrays[start:start + self.CHUNK][image_column])])
        self.columns = {column: list(dataset[column]) for column in self.keep_columns}

    @staticmethod
    def suits(dataset, image_column: str) -> bool:
        """Whether `image_column` of `dataset` holds square images as fixed-shape arrays."""
        feature = getattr(dataset, "features", {}).get(image_column)
        return (type(feature).__name__ in ARRAY_FEATURES and len(dataset) > 0
                and len(set(to_pil(dataset[0][image_column]).size)) == 1)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        items = []
        for index in indices:
            image = self.pixels[index]
            if self.transform.random_flip:
                generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
                _, flip = self.transform.random_choices(image.shape[1::-1], generator)
                image = image[:, ::-1] if flip else image
            items.append({"pixel_values": to_tensor(image),
                          **{column: values[index] for column, values in self.columns.items()}})
        return items


def train_images_for(dataset, image_column: str, transform: ImageTransform, seed: int = 0,
                     keep_columns: Sequence[str] = ()) -> TrainImages:
    """`PreparedTrainImages` where they suit the dataset (square arrays, as the bundled MNIST) and fit in
    PREPARED_BYTES_LIMIT once resized, else `TrainImages`: the same tensors either way."""
    prepared_bytes = len(dataset) * transform.resolution ** 2 * transform.channels
    suits = prepared_bytes <= PREPARED_BYTES_LIMIT and PreparedTrainImages.suits(dataset, image_column)
    images = PreparedTrainImages if suits else TrainImages
    return images(dataset, image_column, transform, seed, keep_columns)


class EpochShuffle(torch.utils.data.Sampler):
    """A shuffle of `TrainImages` that depends only on (its seed, its current epoch)."""

    def __init__(self, train_images: TrainImages):
        self.train_images = train_images

    def __len__(self) -> int:
        return len(self.train_images)

    def __iter__(self):
        generator = torch.Generator().manual_seed(sample_seed(self.train_images.seed, self.train_images.epoch))
        return iter(torch.randperm(len(self.train_images), generator=generator).tolist())


def train_dataloader(train_images: TrainImages, batch_size: int, num_workers: int = 0,
                     shuffle: bool = True) -> torch.utils.data.DataLoader:
    """A DataLoader over `train_images` that never draws from the global torch RNG (so checkpoints resume
    exactly): the shuffle is `EpochShuffle`, and the loader's own seed for workers comes from its generator."""
    return torch.utils.data.DataLoader(
        train_images, batch_size=batch_size, sampler=EpochShuffle(train_images) if shuffle else None,
        num_workers=num_workers, generator=torch.Generator().manual_seed(sample_seed(train_images.seed)))
