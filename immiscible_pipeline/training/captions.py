"""Prompts for text-conditioned training from a dataset's caption column.

Two kinds of column:
- a class-label column (a `datasets.ClassLabel`, e.g. ImageNet's `label` or an imagefolder's class folders):
  the prompt is a template filled with the dataset's own class name, e.g. "a photo of a {}" -> "a photo of a
  tench". ImageNet names are comma-separated synonyms ("tench, Tinca tinca"); the first is used by default.
  Rows labelled -1 (ImageNet's test split) carry no class and are dropped.
- a text column: each row is a caption or a list of captions (one is drawn per use), used as is.

Which column: `prompt_column(dataset, caption_column, instance_prompt)` picks it as diffusers' text-to-image
scripts do (a `text` column unless told otherwise), else the dataset's class labels; `--instance_prompt` adds a
column holding one fixed prompt, for a folder of a few images of one thing without captions.

Every random choice (a synonym, a caption of a list, caption dropout) is fixed by (seed, epoch, row), like
the image augmentations of `data.TrainImages`: a run is reproducible, resumes exactly, and training from the
latent cache sees exactly the prompts that training from images sees.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..data import check_column, sample_seed

SYNONYM_CHOICES = ("first", "random", "all")
NO_LABEL = -1  # the label of rows without a class (ImageNet test split), and the group of dropped prompts
PROMPT_STREAM = 1  # keeps the prompt choices of a row independent of its image augmentations
TEXT_COLUMN = "text"  # diffusers' default --caption_column
INSTANCE_COLUMN = "instance_prompt"  # the column --instance_prompt adds


def _feature_is_integer(feature) -> bool:
    dtype = getattr(feature, "dtype", "")
    return isinstance(dtype, str) and dtype.startswith(("int", "uint"))


@dataclass
class Captioner:
    """Turns the raw values of a caption column into prompts, and into group ids for per-class assignment.

    Build it with `Captioner.for_dataset(dataset, column, ...)`, which checks the column.
    """

    column: str
    class_names: list[str] | None = None  # set for class-label columns
    prompt_template: str = "a photo of a {}"
    synonyms: str = "first"
    caption_dropout: float = 0.0

    def __post_init__(self):
        if self.synonyms not in SYNONYM_CHOICES:
            raise ValueError(f"synonyms must be one of {SYNONYM_CHOICES}, got {self.synonyms!r}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"--caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if self.is_class_label and "{}" not in self.prompt_template:
            raise ValueError(f"--prompt_template must contain '{{}}' where the class name goes, got "
                             f"{self.prompt_template!r}")

    @property
    def is_class_label(self) -> bool:
        return self.class_names is not None

    @classmethod
    def for_dataset(cls, dataset, column: str, prompt_template: str = "a photo of a {}", synonyms: str = "first",
                    caption_dropout: float = 0.0) -> "Captioner":
        """Checks that `column` exists and can make prompts; class names come from its ClassLabel feature."""
        check_column(dataset, column, "--caption_column")
        feature = dataset.features[column]
        names = getattr(feature, "names", None)
        if names is not None:
            return cls(column, list(names), prompt_template, synonyms, caption_dropout)
        if _feature_is_integer(feature):
            raise ValueError(
                f"--caption_column '{column}' holds integer labels without class names (a {feature.dtype} column, "
                f"not a datasets ClassLabel), so --prompt_template {prompt_template!r} has no name to fill in. Cast "
                f"it to a ClassLabel with the class names (dataset.cast_column('{column}', ClassLabel(names=[...]))), "
                f"use an imagefolder whose sub-folders are named after the classes, or point --caption_column at "
                f"a text column.")
        return cls(column, None, prompt_template, synonyms, caption_dropout)

    def labelled_rows(self, dataset) -> list[int] | None:
        """The rows that carry a class (label != -1), or None if every row does (and for text columns)."""
        if not self.is_class_label:
            return None
        labels = list(dataset[self.column])
        keep = [row for row, label in enumerate(labels) if label != NO_LABEL]
        return None if len(keep) == len(labels) else keep

    def class_prompt(self, label: int, generator: torch.Generator | None = None) -> str:
        if not 0 <= label < len(self.class_names):
            raise ValueError(f"label {label} in --caption_column '{self.column}' is not one of its "
                             f"{len(self.class_names)} classes")
        name = self.class_names[label]
        if self.synonyms != "all":
            choices = [part.strip() for part in name.split(",") if part.strip()] or [name]
            name = choices[0] if self.synonyms == "first" else choices[_randint(len(choices), generator)]
        return self.prompt_template.format(name)

    def prompt(self, value, generator: torch.Generator | None = None) -> str:
        """The prompt of one row (before dropout)."""
        if self.is_class_label:
            return self.class_prompt(int(value), generator)
        if isinstance(value, str):
            return value
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            return value[_randint(len(value), generator)]
        raise ValueError(f"--caption_column '{self.column}' must hold strings or non-empty lists of strings, "
                         f"got {value!r}")

    def sample(self, value, generator: torch.Generator | None = None) -> tuple[str, int]:
        """(prompt, group) for one row. With probability `caption_dropout` the prompt is "" (classifier-free
        guidance). The group, for per-class assignment, is the class id for class labels and a stable hash of
        the prompt for text (equal on every process, as global assignment needs); dropped prompts form one
        group of their own (-1), since the model sees them unconditioned."""
        text = self.prompt(value, generator)
        if self.caption_dropout > 0 and torch.rand((), generator=generator).item() < self.caption_dropout:
            return "", NO_LABEL
        return text, (int(value) if self.is_class_label else prompt_id(text))


def prompt_column(dataset, caption_column: str | None = None, instance_prompt: str | None = None):
    """(dataset, the column to make prompts from). An explicit `caption_column` is used as is (checked later by
    `Captioner.for_dataset`); with `instance_prompt`, a column holding it on every row is added; otherwise a
    `text` column as in diffusers' scripts, or else the first class-label column (an imagefolder's `label`)."""
    if instance_prompt is not None:
        if caption_column is not None:
            raise ValueError("pass either --instance_prompt (one prompt for every image) or --caption_column, not both")
        if not instance_prompt.strip():
            raise ValueError("--instance_prompt must not be empty")
        if INSTANCE_COLUMN in dataset.column_names:
            dataset = dataset.remove_columns(INSTANCE_COLUMN)
        return dataset.add_column(INSTANCE_COLUMN, [instance_prompt] * len(dataset)), INSTANCE_COLUMN
    if caption_column is not None:
        return dataset, caption_column
    if TEXT_COLUMN in dataset.column_names:
        return dataset, TEXT_COLUMN
    labels = [name for name, feature in dataset.features.items() if getattr(feature, "names", None) is not None]
    if labels:
        return dataset, labels[0]
    raise ValueError(f"the dataset has no {TEXT_COLUMN!r} column (diffusers' default --caption_column) and no "
                     f"class-label column to make prompts from; its columns are: {', '.join(dataset.column_names)}. "
                     f"Pass --caption_column COLUMN, or --instance_prompt \"a photo of sks dog\" to give every image "
                     f"one prompt.")


def prompt_id(prompt: str) -> int:
    """A non-negative int64 that is the same for the same prompt in every process and run."""
    return int.from_bytes(hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def _randint(n: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(n, (), generator=generator).item()) if n > 1 else 0


def tokenize_prompts(tokenizer, prompts) -> torch.Tensor:
    """Token ids [B, model_max_length], padded and truncated as the SD text encoder expects."""
    return tokenizer(list(prompts), max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids


class PromptedSamples(torch.utils.data.Dataset):
    """Wraps a dataset of training samples (images or cached latents) whose rows hold a raw caption value
    under `caption_key`, and replaces it by `input_ids` (the tokenized prompt) and `group` (see
    `Captioner.sample`). Seed and epoch are those of the wrapped dataset (`start_epoch` is passed on), so
    `data.EpochShuffle` and `data.train_dataloader` take it as they take `TrainImages`."""

    def __init__(self, samples, captioner: Captioner, tokenizer, caption_key: str):
        self.samples, self.captioner, self.tokenizer, self.caption_key = samples, captioner, tokenizer, caption_key

    @property
    def seed(self) -> int:
        return self.samples.seed

    @property
    def epoch(self) -> int:
        return self.samples.epoch

    def start_epoch(self, epoch: int) -> None:
        self.samples.start_epoch(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.samples[index])
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index, PROMPT_STREAM))
        prompt, group = self.captioner.sample(item.pop(self.caption_key), generator)
        item["input_ids"] = tokenize_prompts(self.tokenizer, [prompt])[0]
        item["group"] = group
        return item
