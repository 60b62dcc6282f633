"""Sampling N images from a diffusers pipeline, split across Accelerate processes, seeded per image.

    samples = sample_images(DDIMPipeline.from_pretrained(path), 1000, seed=0, output_dir="samples")
    prompts = class_prompts(["a photo of a 0", ..., "a photo of a 9"], num_images=1000)   # SD: N split by class
    samples = sample_images(sd_pipeline, len(prompts.prompts), prompts=prompts.prompts, ...)

Image i starts from noise drawn with its own generator, seeded from (seed, i). So image i is the same
whatever the batch size or the number of processes, two processes never draw the same noise, and a run with
another seed shares no noise with this one. Images are quantised to uint8 (as a PNG stores them) and, with
`output_dir`, written as `{i:06d}.png`; each process also writes `sampling_process{rank}.json` listing the
indices and seeds it produced, and text-conditioned runs get a `metadata.jsonl` (imagefolder captions).
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm


def shard(num_items: int, num_processes: int = 1, process_index: int = 0) -> range:
    """The contiguous block of global indices that process `process_index` handles (sizes differ by <= 1)."""
    start = num_items * process_index // num_processes
    return range(start, num_items * (process_index + 1) // num_processes)


def image_seed(seed: int, index: int) -> int:
    """The noise seed of image `index` in a run seeded `seed` (well mixed: runs with nearby seeds share nothing)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


@dataclass
class ClassPrompts:
    prompts: list[str]  # one per image
    labels: list[int]  # the class index of each image


def class_prompts(class_texts: Sequence[str], num_images: int | None = None, per_class: int | None = None,
                  weights: Sequence[float] | None = None) -> ClassPrompts:
    """Prompts for class-conditional sampling: `per_class` images of every class, or `num_images` split by
    `weights` (a class distribution; uniform by default) with largest-remainder rounding. Classes come in
    blocks (all of class 0, then class 1, ...)."""
    num_classes = len(class_texts)
    if num_classes == 0:
        raise ValueError("need at least one class prompt")
    if per_class is not None:
        if num_images is not None or weights is not None:
            raise ValueError("give either per_class or num_images (with optional weights), not both")
        counts = [int(per_class)] * num_classes
    else:
        if num_images is None:
            raise ValueError("give num_images or per_class")
        weights = np.ones(num_classes) if weights is None else np.asarray(weights, dtype=np.float64)
        if weights.shape != (num_classes,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be {num_classes} non-negative numbers with a positive sum")
        exact = num_images * weights / weights.sum()
        counts = np.floor(exact).astype(int)
        for c in np.argsort(-(exact - counts), kind="stable")[: num_images - counts.sum()]:
            counts[c] += 1
        counts = counts.tolist()
    labels = [c for c, count in enumerate(counts) for _ in range(count)]
    return ClassPrompts([class_texts[c] for c in labels], labels)


def is_text_conditioned(pipeline) -> bool:
    return getattr(pipeline, "text_encoder", None) is not None or getattr(pipeline, "tokenizer", None) is not None


def pipeline_image_shape(pipeline) -> tuple[int, int, int]:
    """(channels, height, width) of the images the pipeline generates at its default size."""
    if is_text_conditioned(pipeline):
        unet_size = pipeline.unet.config.sample_size
        size = unet_size * pipeline.vae_scale_factor if isinstance(unet_size, int) else None
        if size is None:
            raise ValueError("cannot infer the image size of this pipeline")
        return pipeline.vae.config.out_channels, size, size
    sample_size = pipeline.unet.config.sample_size
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
    return pipeline.unet.config.out_channels, height, width


def to_uint8(images: np.ndarray) -> torch.Tensor:
    """Pipeline output in [0, 1], [N, H, W, C] -> uint8 [N, C, H, W], rounded as diffusers' numpy_to_pil does."""
    return torch.from_numpy((np.clip(images, 0, 1) * 255).round().astype(np.uint8)).permute(0, 3, 1, 2).contiguous()


def save_png(image: torch.Tensor, path: str) -> None:
    array = image.numpy()
    Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)).save(path)


@dataclass
class Samples:
    """What this process generated: global indices, uint8 images [n, C, H, W] (None unless kept in memory)."""

    indices: torch.Tensor
    images: torch.Tensor | None
    prompts: list[str] | None = None


def _generate(pipeline, count: int, generators: list, num_inference_steps: int, eta: float,
              prompts: list[str] | None, guidance_scale: float, pipeline_kwargs: dict | None) -> np.ndarray:
    kwargs = {"generator": generators, "num_inference_steps": num_inference_steps, "output_type": "np"}
    kwargs.update(pipeline_kwargs or {})
    if kwargs.get("timesteps") is not None:
        kwargs["num_inference_steps"] = None  # explicit timesteps instead
    if prompts is not None:
        kwargs.update(prompt=prompts, guidance_scale=guidance_scale)
    else:
        kwargs["batch_size"] = count
    if "eta" in inspect.signature(pipeline.__call__).parameters:
        kwargs["eta"] = eta
    return pipeline(**kwargs).images


def sample_images(pipeline, num_images: int, *, batch_size: int = 64, seed: int = 0, num_inference_steps: int = 50,
                  eta: float = 0.0, prompts: Sequence[str] | None = None, guidance_scale: float = 7.5,
                  accelerator=None, output_dir: str | None = None, keep_in_memory: bool = True,
                  on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
                  progress: bool = True, pipeline_kwargs: dict | None = None) -> Samples:
    """Generates this process's share of `num_images` images from `pipeline` (already on its device).

    prompts: one prompt per image for text-conditioned pipelines (see `class_prompts`); must be None for
        unconditional ones.
    accelerator: splits the images across its processes (contiguous blocks); None means one process.
    output_dir: write each image as `{index:06d}.png` (plus the per-process manifest).
    on_batch: called with (global indices, uint8 images) after each batch, e.g. to compute features
        without keeping the images (`keep_in_memory=False`).
    pipeline_kwargs: more arguments of the pipeline call, e.g. `{"timesteps": [24, 0]}` for a consistency model
        (explicit timesteps replace `num_inference_steps`).
    Returns only this process's images; with an accelerator, all processes return after every image is written.
    """
    if num_images < 0 or batch_size < 1:
        raise ValueError(f"need num_images >= 0 and batch_size >= 1, got {num_images} and {batch_size}")
    text = is_text_conditioned(pipeline)
    if text and prompts is None:
        raise ValueError("this pipeline is text-conditioned: give one prompt per image (see class_prompts)")
    if not text and prompts is not None:
        raise ValueError("prompts were given but the pipeline is unconditional")
    if prompts is not None and len(prompts) != num_images:
        raise ValueError(f"got {len(prompts)} prompts for {num_images} images")
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    is_main = rank == 0
    mine = shard(num_images, world, rank)
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
    if hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(disable=True)
    unet = getattr(pipeline, "unet", None)
    was_training = bool(unet is not None and unet.training)
    if unet is not None:
        unet.eval()

    kept, seeds = [], []
    bar = tqdm(total=len(mine), desc=f"sampling {num_images} images", unit="img", disable=not (progress and is_main))
    try:
        for start in range(mine.start, mine.stop, batch_size):
            batch = range(start, min(start + batch_size, mine.stop))
            batch_seeds = [image_seed(seed, i) for i in batch]
            generators = [torch.Generator("cpu").manual_seed(s) for s in batch_seeds]
            batch_prompts = [prompts[i] for i in batch] if prompts is not None else None
            images = to_uint8(_generate(pipeline, len(batch), generators, num_inference_steps, eta, batch_prompts,
                                        guidance_scale, pipeline_kwargs))
            indices = torch.tensor(list(batch), dtype=torch.int64)
            if output_dir is not None:
                for i, image in zip(batch, images):
                    save_png(image, os.path.join(output_dir, f"{i:06d}.png"))
            if on_batch is not None:
                on_batch(indices, images)
            if keep_in_memory:
                kept.append(images)
            seeds.extend(batch_seeds)
            bar.update(len(batch))
    finally:
        bar.close()
        if unet is not None and was_training:
            unet.train()

    if output_dir is not None:
        _write_manifest(output_dir, rank, world, mine, seeds, seed, num_inference_steps, eta)
        if prompts is not None and is_main:
            with open(os.path.join(output_dir, "metadata.jsonl"), "w") as handle:
                for i, prompt in enumerate(prompts):
                    handle.write(json.dumps({"file_name": f"{i:06d}.png", "text": prompt}) + "\n")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    images = torch.cat(kept) if kept else None
    return Samples(torch.arange(mine.start, mine.stop, dtype=torch.int64), images,
                   [prompts[i] for i in mine] if prompts is not None else None)


def _write_manifest(output_dir, rank, world, mine, seeds, seed, num_inference_steps, eta) -> None:
    record = {"process_index": rank, "num_processes": world, "seed": seed, "num_inference_steps": num_inference_steps,
              "eta": eta, "indices": list(mine), "image_seeds": seeds}
    with open(os.path.join(output_dir, f"sampling_process{rank}.json"), "w") as handle:
        json.dump(record, handle)
