"""Prompts for text-conditioned training from a dataset's caption column.

Two kinds of column:
- a class-label column (a `datasets.ClassLabel`, e.g. ImageNet's `label` or an imagefolder's class folders):
  the prompt is a template filled with the dataset's own class name, e.g. "a photo of a {}" -> "a photo of a
  tench". ImageNet names are comma-separated synonyms ("tench, Tinca tinca"); the first is used by default.
  Rows labelled -1 (ImageNet's test split) carry no class and are dropped.
- a text column: each row is a caption or a list of captions (one is drawn per use), used as is.

All random choices (a synonym, a caption of a list, caption dropout) come from a `torch.Generator` passed
in, so a run is reproducible and the cached-latent path draws exactly what the image path draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

SYNONYM_CHOICES = ("first", "random", "all")
NO_LABEL = -1  # the label of rows without a class (ImageNet test split) and the group of dropped prompts


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
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
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
        features = dataset.features
        if column not in features:
            raise ValueError(f"--caption_column '{column}' is not a column of the dataset; its columns are: "
                             f"{', '.join(features)}")
        feature = features[column]
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

    def keep(self, value) -> bool:
        """False for rows that carry no class (label -1); every text row is kept."""
        return not (self.is_class_label and int(value) == NO_LABEL)

    def class_prompt(self, label: int, generator: torch.Generator | None = None) -> str:
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

    def prompts_and_groups(self, values: Sequence, generator: torch.Generator | None = None):
        """Prompts for a batch (a fraction `caption_dropout` blanked to "" for classifier-free guidance) and
        the group of each sample: its class id for class labels, its prompt for text; dropped prompts form
        one group of their own, since the model sees them unconditioned."""
        prompts, groups = [], []
        for value in values:
            text = self.prompt(value, generator)
            dropped = self.caption_dropout > 0 and torch.rand((), generator=generator).item() < self.caption_dropout
            prompts.append("" if dropped else text)
            if self.is_class_label:
                groups.append(NO_LABEL if dropped else int(value))
            else:
                groups.append("" if dropped else text)
        return prompts, groups


def _randint(n: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(n, (), generator=generator).item()) if n > 1 else 0


def tokenize_prompts(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids [B, model_max_length], padded and truncated as the SD text encoder expects."""
    return tokenizer(list(prompts), max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids
