"""Training-loop helpers the trainers share: loss target, checkpoints and exact resume, EMA state hooks,
trackers, precision, xformers, sample grids.

None of this knows which model is trained; each piece is small enough to read at the call site:

    register_checkpoint_hooks(accelerator, model_folder="unet", ema=ema)       # before accelerator.prepare
    checkpoint = find_checkpoint(args.resume_from_checkpoint, args.output_dir)
    ...
    loss = diffusion_loss(noise_scheduler, model_pred, clean, noise, timesteps)    # target from the given noise
    ...
    save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
CHECKPOINT_PREFIX = "checkpoint-"
PRECISION_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# --- the loss ---------------------------------------------------------------------------------------------

def training_target(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict, by the scheduler's `prediction_type`: the noise that was added
    ("epsilon"), the velocity built from it ("v_prediction"), or the clean sample ("sample").

    `noise` must be the noise actually added to `clean` (with Immiscible Diffusion: the assigned noise)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    if prediction_type == "sample":
        return clean
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def diffusion_loss(scheduler, model_pred: torch.Tensor, clean: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the model's prediction and `training_target`, computed in float32."""
    return F.mse_loss(model_pred.float(), training_target(scheduler, clean, noise, timesteps).float())


# --- precision and attention ------------------------------------------------------------------------------

def weight_dtype(mixed_precision: str | None) -> torch.dtype:
    """The dtype for frozen weights under `mixed_precision` ("no", "fp16", "bf16"); trained weights stay float32."""
    return PRECISION_DTYPES.get(mixed_precision or "no", torch.float32)


def check_xformers_available() -> None:
    """Raises a ValueError naming the flag if xformers cannot be used."""
    from diffusers.utils.import_utils import is_xformers_available

    if not is_xformers_available():
        raise ValueError("--enable_xformers_memory_efficient_attention needs the xformers package, which is not "
                         "installed: pip install xformers (for your torch and CUDA), or drop the flag")


# --- checkpoints and resume -------------------------------------------------------------------------------

def checkpoint_step(path: str | os.PathLike) -> int:
    """The optimisation step a `checkpoint-<step>` folder was saved at."""
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint folder (expected a name like {CHECKPOINT_PREFIX}500)")
    return int(match.group(1))


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-<step>` folders in `output_dir`, oldest step first."""
    if not Path(output_dir).is_dir():
        return []
    found = [path for path in Path(output_dir).iterdir()
             if path.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", path.name)]
    return sorted(found, key=checkpoint_step)


def rotate_checkpoints(output_dir: str | os.PathLike, total_limit: int | None) -> list[Path]:
    """Deletes the oldest checkpoints so that at most `total_limit` remain; returns what it deleted."""
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    doomed = checkpoints[:max(0, len(checkpoints) - total_limit)]
    for path in doomed:
        logger.info("removing checkpoint %s (--checkpoints_total_limit %d)", path, total_limit)
        shutil.rmtree(path)
    return doomed


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, total_limit: int | None = None) -> Path:
    """`accelerator.save_state` into `output_dir/checkpoint-<step>`, then rotation of old ones. Call it on every
    process: each saves its own RNG state, and DeepSpeed or FSDP shard the rest.

    The state is written to `checkpoint-<step>.partial` and renamed once every process has finished, and old
    checkpoints are deleted only then: a save cut short (a kill after Ctrl-C, a full disk) never leaves a
    half-written folder for `--resume_from_checkpoint latest`, nor deletes the last good one."""
    path = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    partial = path.with_name(path.name + ".partial")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)  # left by an earlier save that was cut short
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if path.exists():
            shutil.rmtree(path)
        partial.rename(path)
        rotate_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    logger.info("saved state to %s", path)
    return path


def end_training(accelerator=None) -> None:
    """A pause with the GIL free, then `accelerator.end_training()` (trackers closed, process group destroyed);
    without an accelerator, the process group of accelerate's shared state is destroyed.

    With several processes on gloo (CPU), the process group's worker threads free each finished collective's
    tensors, which needs the GIL. If the group is destroyed (by `destroy_process_group`, or later with the DDP
    model that owns it) before they are done, its destructor joins them while holding the GIL and the process
    hangs for ever: torch issue #190489, seen here in about one of seven 2-process runs. The pause lets them
    finish first; no collective follows it."""
    from accelerate import PartialState

    state = accelerator if accelerator is not None else PartialState()
    if state.num_processes > 1:
        time.sleep(0.5)
    if accelerator is not None:
        accelerator.end_training()
    else:
        state.destroy_process_group()


class StopOnSignal:
    """Turns Ctrl-C (SIGINT) and SIGTERM (a cluster's pre-emption, torchrun's shutdown) into a request to stop
    at the next step boundary, so that the loop can save a checkpoint and leave instead of dying mid-step:

        stop = StopOnSignal(accelerator)
        for batch in loader:
            ...one optimisation step...
            if stop.requested():      # on every process at once: the flag is reduced across processes
                save_checkpoint(...)
                break
        stop.restore()

    A second Ctrl-C at least `patience` seconds after the first stops at once (KeyboardInterrupt); repeated
    SIGTERMs and quick repeats are ignored, as a scheduler may send SIGTERM to every process and torchrun then
    passes it on once more. Under torchrun the ranks run in sessions of their own: a terminal's Ctrl-C reaches
    them through the agent. Handlers can only be set from the main thread; elsewhere the object does nothing
    and `requested()` only reports other processes' requests.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, accelerator, patience: float = 2.0):
        self.accelerator, self.patience = accelerator, patience
        self.first_signal, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        # Only notes the request: the collective flag is set by `requested()`, outside the handler.
        if self.first_signal is None:
            self.first_signal = time.monotonic()
            logger.warning("%s received: stopping after this step with a checkpoint (Ctrl-C again to stop at "
                           "once)", signal.Signals(signum).name)
        elif signum == signal.SIGINT and time.monotonic() - self.first_signal >= self.patience:
            self.restore()
            raise KeyboardInterrupt

    def requested(self) -> bool:
        """True on every process once any of them received a signal (a collective: call it on all)."""
        if self.first_signal is not None:
            self.accelerator.set_trigger()
        return self.accelerator.check_trigger()

    def restore(self) -> None:
        """Puts the previous handlers back."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def exit(self, step: int, output_dir: str | os.PathLike) -> None:
        """Ends the run after the checkpoint of `step` was saved: trackers closed, exit status 130 (as Ctrl-C)."""
        self.restore()
        logger.warning("Interrupted at step %d: its checkpoint is in %s; continue with --resume_from_checkpoint "
                       "latest", step, output_dir)
        end_training(self.accelerator)
        sys.exit(130)


def find_checkpoint(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: None if not asked; "latest" is the newest in `output_dir` (None if
    there is none yet, so a first run with `latest` just starts); otherwise a path, or a checkpoint name in
    `output_dir`, which must exist."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    for candidate in (Path(resume_from_checkpoint), Path(output_dir) / resume_from_checkpoint):
        if candidate.is_dir():
            checkpoint_step(candidate)  # checks the name
            return candidate
    raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint}: no such checkpoint folder (as a path or "
                     f"in {output_dir}); available: {[path.name for path in list_checkpoints(output_dir)] or 'none'}")


def resume_position(global_step: int, updates_per_epoch: int, gradient_accumulation_steps: int) -> tuple[int, int]:
    """(epoch, batches of that epoch already consumed) after `global_step` optimisation steps."""
    return global_step // updates_per_epoch, (global_step % updates_per_epoch) * gradient_accumulation_steps


def updates_per_epoch(num_batches: int, gradient_accumulation_steps: int) -> int:
    """Optimisation steps per epoch: Accelerate also steps on an epoch's last, shorter accumulation."""
    return math.ceil(num_batches / gradient_accumulation_steps)


# --- EMA ------------------------------------------------------------------------------------------------

EMA_STATE_FILE = "ema_state.json"


def save_ema(ema, folder: str | os.PathLike) -> None:
    """An `EMAModel` (built with `model_cls` and `model_config`) as a plain diffusers model folder holding the
    averaged weights (loadable with `from_pretrained`), plus its decay state in `ema_state.json`."""
    with torch.random.fork_rng(devices=[]):  # building the model draws initial weights: keep training's RNG
        model = ema.model_cls.from_config(ema.model_config)
    ema.copy_to(model.parameters())
    model.save_pretrained(folder)
    state = {key: value for key, value in ema.state_dict().items() if key != "shadow_params"}
    (Path(folder) / EMA_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def load_ema(ema, folder: str | os.PathLike) -> None:
    """Restores what `save_ema` wrote into `ema`, in place (bit-exact)."""
    with torch.random.fork_rng(devices=[]):
        model = ema.model_cls.from_pretrained(folder)
    state = json.loads((Path(folder) / EMA_STATE_FILE).read_text())
    device = ema.shadow_params[0].device if ema.shadow_params else None
    ema.load_state_dict({**state, "shadow_params": [param.detach().to(device) for param in model.parameters()]})


def register_checkpoint_hooks(accelerator, model_folder: str = "unet", ema=None, ema_folder: str | None = None) -> None:
    """Save trained models and their EMA inside each checkpoint as diffusers folders (safetensors), and load
    them back on `accelerator.load_state`.

    A checkpoint then holds `<model_folder>/` (loadable with `from_pretrained`) and, with `ema` (a diffusers
    `EMAModel` built with `model_cls` and `model_config`), `<ema_folder>/` (default `<model_folder>_ema`), see
    `save_ema`. With several prepared models the folders get a suffix `_1`, `_2`, ...
    Register before `accelerator.prepare`."""
    ema_folder = ema_folder or f"{model_folder}_ema"

    def folder(index: int) -> str:
        return model_folder if index == 0 else f"{model_folder}_{index}"

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for index, model in enumerate(models):
                accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, folder(index)))
            if ema is not None:
                save_ema(ema, os.path.join(output_dir, ema_folder))
        while weights:  # saved above; Accelerate need not save them again
            weights.pop()

    def load_hook(models, input_dir):
        index = 0
        while models:
            model = accelerator.unwrap_model(models.pop(0))
            loaded = type(model).from_pretrained(input_dir, subfolder=folder(index))
            model.load_state_dict(loaded.state_dict())
            index += 1
        if ema is not None:
            load_ema(ema, os.path.join(input_dir, ema_folder))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


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


# --- trackers and images ----------------------------------------------------------------------------------

def check_report_to(report_to: str) -> None:
    """Raises a ValueError naming the flag if the requested tracker is not installed."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    needed = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    for name in (needed if report_to == "all" else [report_to]):
        if name in needed and not needed[name]():
            raise ValueError(f"--report_to {report_to} needs {name}, which is not installed: pip install {name}")


def tracker_config(values: dict) -> dict:
    """Run settings as tracker hyper-parameters: TensorBoard takes only numbers, strings and booleans."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in values.items()}


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
