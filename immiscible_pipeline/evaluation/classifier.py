"""The dataset classifier whose features make FID meaningful on MNIST-like data: trained once, cached on disk.

    features = cached_classifier_features(ReferenceSpec("mnist"), resolution=16, channels=1, cache_dir=...)
    features.info["test_accuracy"]     # reported next to every FID computed with it

The cache holds the weights (safetensors) and a JSON record (test accuracy, training time, settings), keyed by
the dataset, resolution, channels and training settings. A second call loads it instead of training.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .features import ClassifierFeatures, SmallClassifier, uint8_to_unit
from .reference_images import load_reference_images, ReferenceSpec

CLASSIFIER_VERSION = 2  # bump when SmallClassifier or the training recipe changes: old caches are then ignored


@dataclass(frozen=True)
class ClassifierTraining:
    """Training settings. The defaults reach ~98-99% on MNIST at 16 px in well under a minute on 2 CPU cores."""

    steps: int = 1500
    batch_size: int = 128
    learning_rate: float = 2e-3
    seed: int = 0
    max_train_images: int | None = None  # a subset, for quick tests
    max_test_images: int | None = None


def train_classifier(train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
                     test_labels: torch.Tensor, settings: ClassifierTraining = ClassifierTraining(),
                     num_classes: int | None = None, progress: bool = False) -> tuple[SmallClassifier, dict]:
    """Trains a `SmallClassifier` on uint8 images with Adam and a cosine learning-rate decay; deterministic
    for a given seed on a given machine. Returns the model (eval mode) and a record with the test accuracy
    and the feature scale. The global RNG state is left as it was."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)  # initial weights
        model = SmallClassifier(in_channels=train_images.shape[1], num_classes=num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(settings.steps, 1))
    start = time.perf_counter()
    model.train()
    order, cursor = torch.randperm(len(train_images), generator=generator), 0
    for _ in tqdm(range(settings.steps), desc="training the FID classifier", disable=not progress):
        if cursor + settings.batch_size > len(order):
            order, cursor = torch.randperm(len(train_images), generator=generator), 0
        batch = order[cursor:cursor + settings.batch_size]
        cursor += settings.batch_size
        loss = F.cross_entropy(model(uint8_to_unit(train_images[batch])), train_labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.inference_mode():
        # One scale for all features, so that their mean square is 1 on (up to 5000) training images: keeps
        # KID's polynomial kernel (x.y / D + 1)^3 in its intended range; FID is only multiplied by a constant.
        probe = model.features(uint8_to_unit(train_images[:5000]))
        feature_scale = float(probe.pow(2).mean().rsqrt())
        correct = sum(int((model(uint8_to_unit(test_images[i:i + 1000])).argmax(1) == test_labels[i:i + 1000]).sum())
                      for i in range(0, len(test_images), 1000))
    record = {"test_accuracy": correct / max(len(test_images), 1), "train_seconds": round(seconds, 2),
              "feature_scale": feature_scale,
              "num_train_images": len(train_images), "num_test_images": len(test_images),
              "num_classes": num_classes, **asdict(settings)}
    return model, record


def _test_split(spec: ReferenceSpec) -> ReferenceSpec | None:
    """The split to measure accuracy on: MNIST's test split; for other data, "test" if it exists, else a
    held-out part of the training split (None)."""
    if spec.is_bundled_mnist:
        return spec.with_split("test")
    if spec.is_folder:
        return None
    try:
        from datasets import get_dataset_split_names

        return spec.with_split("test") if "test" in get_dataset_split_names(spec.name, spec.config_name) else None
    except Exception:  # noqa: BLE001 - no split listing: fall back to a held-out part of train
        return None


def classifier_key(spec: ReferenceSpec, resolution: int, channels: int, settings: ClassifierTraining) -> str:
    blob = json.dumps({"data": spec.with_split("train").identity(), "label_column": spec.label_column,
                       "resolution": resolution, "channels": channels, "training": asdict(settings),
                       "version": CLASSIFIER_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_classifier_features(spec: ReferenceSpec, resolution: int, channels: int, cache_dir: str,
                               settings: ClassifierTraining = ClassifierTraining(),
                               progress: bool = True) -> ClassifierFeatures:
    """The classifier feature extractor for this dataset at this resolution: loaded from `cache_dir` if it
    was trained before, else trained on the dataset's training split (labels required) and cached.
    Not safe for several processes at once: in Accelerate, call it under `accelerator.main_process_first()`."""
    key = classifier_key(spec, resolution, channels, settings)
    base = os.path.join(cache_dir, "classifiers", f"classifier-{key}")
    name = f"classifier-{key}"
    if os.path.isfile(base + ".json") and os.path.isfile(base + ".safetensors"):
        with open(base + ".json") as handle:
            record = json.load(handle)
        model = SmallClassifier(**record["config"])
        model.load_state_dict(load_file(base + ".safetensors"))
        return ClassifierFeatures(model, name, {**record, "from_cache": True}, record["feature_scale"])

    train_spec = spec.with_split("train")
    images, labels = load_reference_images(train_spec, resolution, channels, settings.max_train_images,
                                           seed=settings.seed, with_labels=True)
    test_spec = _test_split(spec)
    if test_spec is not None:
        test_images, test_labels = load_reference_images(test_spec, resolution, channels, settings.max_test_images,
                                                         seed=settings.seed, with_labels=True)
    else:  # hold out 10% of the training split
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(settings.seed))
        held = order[: max(1, len(images) // 10)]
        kept = order[len(held):]
        test_images, test_labels, images, labels = images[held], labels[held], images[kept], labels[kept]
    model, record = train_classifier(images, labels, test_images, test_labels, settings, progress=progress)
    record.update(config=model.config, dataset=train_spec.identity(), resolution=resolution, channels=channels)
    os.makedirs(os.path.dirname(base), exist_ok=True)
    save_file(model.state_dict(), base + ".safetensors.tmp")
    os.replace(base + ".safetensors.tmp", base + ".safetensors")
    with open(base + ".json.tmp", "w") as handle:
        json.dump(record, handle, indent=2)
    os.replace(base + ".json.tmp", base + ".json")
    return ClassifierFeatures(model, name, {**record, "from_cache": False}, record["feature_scale"])
