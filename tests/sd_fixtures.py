"""Fixtures of the latent SD tests: a tiny SD model folder and tiny labelled / captioned image folders.

Imported by the test modules that use them (`from sd_fixtures import ...`); built from configs, offline. Also
`scalars`, the logged values of a run.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_images

from immiscible_pipeline.training.tiny_stable_diffusion import build_tiny_sd

# ImageNet-style class names: comma-separated synonyms, the first one is the prompt's name by default.
CLASS_FOLDERS = {"class_0": "tench, Tinca tinca", "class_1": "goldfish, Carassius auratus"}


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module, restored afterwards: the tiny models' ops are too small to share, and
    on a busy machine two threads waiting on each other made a 2-step generation take seconds instead of 0.1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A StableDiffusionPipeline folder (16 px images, 8 px latents) built from configs. Read-only."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "model")


@pytest.fixture(scope="session")
def labelled_folder(tmp_path_factory, tiny_imagefolder):
    """The shared tiny imagefolder with its class sub-folders renamed after ImageNet classes, so its `label`
    column is a ClassLabel named "goldfish, Carassius auratus" / "tench, Tinca tinca". Read-only."""
    folder = tmp_path_factory.mktemp("labelled") / "images"
    shutil.copytree(tiny_imagefolder, folder)
    for old, new in CLASS_FOLDERS.items():
        (folder / old).rename(folder / new)
    return folder


def write_captioned_folder(folder, count: int = 8):
    """Images with a metadata.jsonl: `text` (a list of two captions per image) and `class_id` (plain integers,
    no class names)."""
    paths = write_images(folder, count=count, seed=1)
    with open(folder / "metadata.jsonl", "w") as handle:
        for index, path in enumerate(paths):
            row = {"file_name": path.relative_to(folder).as_posix(), "class_id": index % 2,
                   "text": [f"a red shape number {index}", f"a blue shape number {index}"]}
            handle.write(json.dumps(row) + "\n")
    return folder


@pytest.fixture(scope="session")
def captioned_folder(tmp_path_factory):
    return write_captioned_folder(tmp_path_factory.mktemp("captioned"))


def scalars(output_dir) -> dict:
    """{tag: [values by step]} from a run's TensorBoard logs (output_dir/logs)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for events in sorted((Path(output_dir) / "logs").rglob("events.out.tfevents*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found[tag] = [event.value for event in accumulator.Scalars(tag)]
    return found
