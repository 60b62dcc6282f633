"""Training and reference images, below both `training/` and `evaluation/` (neither imports the other for them).

- `sources`: a Hub dataset, an image folder or the bundled offline MNIST; column checks that name the flag.
- `transforms`: a stored image to a [-1, 1] tensor (resize, crop, flip), seeded per image.
- `train_images`: `TrainImages` and the loader whose shuffle and augmentations depend only on (seed, epoch).
"""

from .sources import (IMAGE_EXTENSIONS, MNIST_SPLITS, check_column, check_image_files, class_label_names,
                      describe_dataset, image_files, load_image_dataset, load_mnist, mnist_arrays, mnist_path)
from .train_images import (EpochShuffle, PreparedTrainImages, TrainImages, sample_seed, train_dataloader,
                           train_images_for)
from .transforms import CHANNEL_MODES, ImageTransform, to_pil, to_tensor, to_uint8

__all__ = ["CHANNEL_MODES", "IMAGE_EXTENSIONS", "MNIST_SPLITS", "EpochShuffle", "ImageTransform",
           "PreparedTrainImages", "TrainImages", "check_column", "check_image_files", "class_label_names",
           "describe_dataset", "image_files", "load_image_dataset", "load_mnist", "mnist_arrays", "mnist_path",
           "sample_seed", "to_pil", "to_tensor", "to_uint8", "train_dataloader", "train_images_for"]
