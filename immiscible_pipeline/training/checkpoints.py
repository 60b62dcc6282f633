"""Checkpoints and exact resume: `checkpoint-<step>` folders written atomically and rotated, the models and
their EMA saved inside them as diffusers folders, and where in the data a resumed run starts.

    register_checkpoint_hooks(accelerator, model_folder="unet", ema=ema)     # before accelerator.prepare
    ...
    num_update_steps, num_epochs = epoch_plan(len(loader), args.gradient_accumulation_steps, max_train_steps)
    global_step, first_epoch, resume_batches = resume(accelerator, args, num_update_steps)
    ...
    save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def epoch_plan(num_batches: int, gradient_accumulation_steps: int, max_train_steps: int) -> tuple[int, int]:
    """(optimisation steps per epoch, epochs to run) from the prepared loader's length."""
    num_update_steps = updates_per_epoch(num_batches, gradient_accumulation_steps)
    return num_update_steps, math.ceil(max_train_steps / num_update_steps)


def resume(accelerator, args, num_update_steps: int) -> tuple[int, int, int]:
    """Loads --resume_from_checkpoint if there is one (weights, EMA, optimizer, scheduler and every process's
    RNG) and returns (global_step, first_epoch, batches of that epoch to skip); (0, 0, 0) for a new run."""
    checkpoint = find_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if checkpoint is None:
        if args.resume_from_checkpoint is not None:
            logger.info("No checkpoint in %s yet: starting a new run", args.output_dir)
        return 0, 0, 0
    logger.info("Resuming from checkpoint %s", checkpoint)
    accelerator.load_state(str(checkpoint))
    global_step = checkpoint_step(checkpoint)
    if accelerator.is_main_process:
        trim_eval_history(args.output_dir, global_step)
    return (global_step, *resume_position(global_step, num_update_steps, args.gradient_accumulation_steps))


CHECKPOINT_PREFIX = "checkpoint-"
EVAL_HISTORY = "eval_history.jsonl"  # one JSON line per evaluation during training (the FID curve)


def claim_output_dir(output_dir: str | os.PathLike, resuming: bool, overwrite: bool,
                     delete: bool = True) -> list[Path]:
    """Refuses to start a new run where an earlier one left checkpoints or an evaluation history (its
    checkpoints would be rotated with the new run's, "latest" would later resume it, the histories would mix),
    unless `overwrite` (--overwrite_output_dir): then those are deleted, if `delete` (the main process).
    Returns what is, or would be, deleted."""
    if resuming:
        return []
    earlier = list_checkpoints(output_dir) + [path for path in [Path(output_dir) / EVAL_HISTORY] if path.is_file()]
    if earlier and not overwrite:
        names = ", ".join(path.name for path in earlier)
        raise ValueError(f"--output_dir {output_dir} holds an earlier run ({names}): pass --resume_from_checkpoint "
                         "latest to continue it, --overwrite_output_dir to delete these and start over, or another "
                         "--output_dir")
    for path in earlier if delete else []:
        logger.info("--overwrite_output_dir: deleting %s", path)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return earlier


def trim_eval_history(output_dir: str | os.PathLike, step: int) -> None:
    """Drops the evaluations after `step` from the history, which a run resumed at `step` will make again."""
    history = Path(output_dir) / EVAL_HISTORY
    if history.is_file():
        lines = history.read_text().splitlines(keepends=True)
        history.write_text("".join(line for line in lines if json.loads(line)["step"] <= step))


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
