"""What a trainer records of its noise coupling, so that sampling can draw noise the way training paired it.

    record = TrainingCoupling(method="linear", group_size=64, scope="local", num_processes=1)
    record.save(output_dir)                         # immiscible_coupling.json beside model_index.json
    record = TrainingCoupling.load(output_dir)      # a folder, or a Hub repo id; None if the file is absent

A pipeline folder without the file (a vanilla model, or one trained elsewhere) has no coupling to keep.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

COUPLING_FILE = "immiscible_coupling.json"
METHODS = ("none", "linear", "knn")


@dataclass
class TrainingCoupling:
    """How training paired each clean sample with its noise.

    method: "none" (independent noise), "linear" (the batch's noise assigned to its samples) or "knn"
        (nearest of k draws per sample).
    group_size: samples per assignment problem at training (the per-process batch, times the processes with
        the global scope; for per-class assignment, the expected size of one class's group in a batch).
    k: candidates per sample for "knn".
    """

    method: str = "none"
    group_size: int = 1
    k: int = 1
    scope: str = "local"
    num_processes: int = 1
    per_class: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"coupling method must be one of {METHODS}, got {self.method!r}")
        if self.group_size < 1 or self.k < 1:
            raise ValueError(f"group_size and k must be at least 1, got {self.group_size} and {self.k}")

    @property
    def is_coupled(self) -> bool:
        """Whether training's noise depended on its images (linear of a single sample pairs nothing)."""
        return self.method == "knn" and self.k > 1 or self.method == "linear" and self.group_size > 1

    def describe(self) -> str:
        if self.method == "knn":
            return f"nearest of k = {self.k} noises per sample"
        if self.method == "linear":
            return f"linear assignment in groups of {self.group_size}"
        return "independent noise"

    def save(self, folder: str) -> str:
        path = os.path.join(folder, COUPLING_FILE)
        with open(path, "w") as handle:
            json.dump(asdict(self), handle, indent=2)
            handle.write("\n")
        return path

    @classmethod
    def load(cls, source: str) -> "TrainingCoupling | None":
        """The record of a pipeline folder or Hub repo id; None where there is none."""
        if os.path.isdir(source):
            path = os.path.join(source, COUPLING_FILE)
            if not os.path.isfile(path):
                return None
        else:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError

            try:
                path = hf_hub_download(source, COUPLING_FILE)
            except EntryNotFoundError:
                return None
        with open(path) as handle:
            try:
                fields = json.load(handle)
                return cls(**fields)
            except (json.JSONDecodeError, TypeError) as error:
                raise ValueError(f"{path} is not a valid coupling record: {error}") from error


def coupling_of_run(method: str, k: int, batch_size: int, scope: str, num_processes: int,
                    class_names: list | None = None) -> TrainingCoupling:
    """The coupling a trainer's flags give: the assignment group is the per-process batch (times the processes
    where the scope, "auto" resolved, is global); linear assignment within each class (`class_names`: the classes
    of a run that assigns per class) splits it into groups of about B / classes. Groups by free-text prompt,
    whose sizes vary, are not modelled: the batch is recorded."""
    from ..noise.global_batch import resolve_scope

    scope = resolve_scope(scope, batch_size, num_processes) if num_processes > 1 else "local"  # one process: the same
    group = batch_size * (num_processes if scope == "global" else 1)
    num_classes = len(class_names) if class_names and method == "linear" else 0
    if num_classes:
        group = max(1, round(group / num_classes))
    return TrainingCoupling(method=method, group_size=group, k=k if method == "knn" else 1, scope=scope,
                            num_processes=num_processes, per_class=bool(num_classes))
