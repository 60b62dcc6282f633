"""Sample grids during training: sampling with a fixed seed from the EMA weights, grids, and sending images to
the trackers."""

from __future__ import annotations

import contextlib
import math
from typing import Iterable

import numpy as np
import torch
from PIL import Image


@contextlib.contextmanager
def averaged_weights(parameters: Iterable[torch.nn.Parameter], ema=None):
    """Within the block the parameters hold the EMA weights (if `ema` is given); restored afterwards."""
    if ema is None:
        yield
        return
    parameters = list(parameters)
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


def image_grid(images: list[Image.Image], min_cell: int = 64, cols: int | None = None) -> Image.Image:
    """A grid of equal-size images (near-square unless `cols` is given), enlarged (nearest neighbour) so a cell
    is at least `min_cell` px."""
    from diffusers.utils import make_image_grid

    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    images = images + [Image.new(images[0].mode, images[0].size)] * (rows * cols - len(images))
    grid = make_image_grid(images, rows=rows, cols=cols)
    scale = math.ceil(min_cell / min(images[0].size))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST) if scale > 1 else grid


def log_images(accelerator, tag: str, images: list[Image.Image], step: int) -> None:
    """Sends images to every active tracker that takes images (TensorBoard, Weights & Biases)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            arrays = np.stack([np.asarray(image.convert("RGB")) for image in images])
            tracker.writer.add_images(tag, arrays, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image) for image in images]}, step=step)


def sample_images(pipeline, seed: int = 0, **call_kwargs) -> list:
    """PIL images from a diffusers pipeline (`call_kwargs`: batch_size, num_inference_steps, prompt ...),
    reproducible from `seed`: a CPU generator, so the same on any device, and the global RNG is not touched.
    The denoiser is in eval mode meanwhile (dropout off) and back in its former mode afterwards."""
    denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
    was_training = denoiser.training
    denoiser.eval()
    try:
        pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator("cpu").manual_seed(seed)
        return pipeline(generator=generator, output_type="pil", **call_kwargs).images
    finally:
        denoiser.train(was_training)
