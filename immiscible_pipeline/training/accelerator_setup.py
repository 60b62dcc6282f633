"""Setting up and ending a run: the Accelerator, CPU threads, EMA, the learning-rate schedule, the precision of
frozen weights, tracker settings, and a clean end with several processes.

    accelerator, repo_id = setup_accelerator(args)
    lr_scheduler, max_train_steps = make_lr_scheduler(args, optimizer, len(loader), accelerator, num_epochs)
    ema = make_ema(model, args, accelerator.device)
    ...
    end_training(accelerator)
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
from pathlib import Path

import torch

from .checkpoints import claim_output_dir, find_checkpoint, updates_per_epoch
from .hub_publishing import create_hub_repo

logger = logging.getLogger(__name__)


def setup_accelerator(args):
    """The Accelerator (accumulation, precision, tracker, logging folder), the run's seed (`args.seed`: --seed, or
    one drawn and recorded, see `run_seed`) set on every process, the output folder and, with --push_to_hub, the
    Hub repo (created first so a bad token fails early). Returns (accelerator, repo_id or None).

    The trainers later call `seed_noise_streams(args.seed, accelerator)`: process p then draws its noise and
    timesteps from a stream of its own that no run's initial weights come from."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    advice = cpu_thread_advice(accelerator.device.type, torch.get_num_threads(), available_cores(),
                               accelerator.num_processes)
    if advice and accelerator.is_main_process:
        logger.warning(advice)
    args.seed = run_seed(args.seed, args.resume_from_checkpoint, args.output_dir, accelerator)
    set_seed(args.seed)  # the same initial weights on every process
    accelerator.register_save_state_pre_hook(
        lambda models, weights, folder: record_seed(args.seed, folder, accelerator.is_main_process))
    # every process checks (so that all stop alike), the main one deletes
    claim_output_dir(args.output_dir, args.resume_from_checkpoint is not None, args.overwrite_output_dir,
                     delete=accelerator.is_main_process)
    repo_id = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub:
            repo_id = create_hub_repo(args.output_dir, args.hub_model_id, args.hub_token, args.hub_private_repo)
    return accelerator, repo_id


NOISE_STREAM = 0x6E6F6973  # "nois": mixed into the noise streams' seeds, hashed apart from the weight seeds


def noise_stream_seed(seed: int, process_index: int) -> int:
    """The seed of process `process_index`'s noise and timesteps in a run of seed `seed`: distinct on each
    process, and apart from every run's initial weights (seed + p would be run seed + p's weights) unless two
    32-bit hashes collide."""
    from ..data import sample_seed

    return sample_seed(seed, NOISE_STREAM, process_index) % 2**32  # numpy's seeds are 32-bit


def seed_noise_streams(seed: int, accelerator) -> None:
    """From here on, each process draws its noise and timesteps from `noise_stream_seed(seed, its index)`."""
    from accelerate.utils import set_seed

    set_seed(noise_stream_seed(seed, accelerator.process_index))


SEED_FILE = "run_seed.json"  # in every checkpoint: the seed a resumed run continues with


def run_seed(seed: int | None, resume_from_checkpoint: str | None, output_dir, accelerator) -> int:
    """The run's seed: `seed` (--seed) if given; when resuming without it, the seed the checkpoint records (0 for a
    checkpoint from before seeds were recorded: the data seed such runs used); otherwise one drawn on the main
    process and sent to the others, logged and then recorded with the run's settings (training_config.json, the
    tracker's config), so that `--seed <it>` repeats the run.

    Without a seed every process would start from its default generator state, which on CUDA is the same on
    every process: all ranks would draw the same noise (the same noise W times in a global assignment)."""
    if seed is not None:
        return int(seed)
    checkpoint = find_checkpoint(resume_from_checkpoint, output_dir)  # on every process: a bad name fails on all
    if checkpoint is not None:
        record = Path(checkpoint) / SEED_FILE
        seed = json.loads(record.read_text())["seed"] if record.is_file() else 0
        logger.info("Resuming without --seed: continuing with the seed of %s, %d", checkpoint, seed)
        return int(seed)
    drawn = [secrets.randbelow(2**31) if accelerator.is_main_process else None]  # + process index stays < 2**32
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(drawn, from_process=0)
    if accelerator.is_main_process:
        logger.info("No --seed given: this run's seed is %d (recorded in its config; --seed %d repeats the run)",
                    drawn[0], drawn[0])
    return int(drawn[0])


def record_seed(seed: int, checkpoint_folder, is_main_process: bool) -> None:
    """Writes the run's seed into a checkpoint being saved (an `accelerator.save_state` pre-hook), so that
    --resume_from_checkpoint continues with it even without --seed."""
    if is_main_process:
        Path(checkpoint_folder).mkdir(parents=True, exist_ok=True)
        (Path(checkpoint_folder) / SEED_FILE).write_text(json.dumps({"seed": seed}) + "\n")


def cpu_thread_advice(device_type: str, threads: int, cores: int, processes: int) -> str | None:
    """A warning when CPU training leaves cores idle, else None. `accelerate launch` without a config sets
    OMP_NUM_THREADS=1 on a machine with no GPU (the MNIST demo then ran 1.6x slower on 2 cores)."""
    per_process = cores // max(processes, 1)
    if device_type != "cpu" or threads >= per_process:
        return None
    return (f"Training on the CPU with {threads} thread(s) per process while {cores} cores are free for "
            f"{processes} process(es): to use them, launch with `accelerate launch --num_cpu_threads_per_process "
            f"{per_process} ...` (or set OMP_NUM_THREADS={per_process})")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Devices with torch's fused AdamW kernel. On a CPU it takes the AdamW step of the 0.64M-parameter demo UNet from
# about 7.5 ms to 1.2 ms (1 thread, measured here): a tenth of a demo step.
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def make_adamw(parameters, args, device, learning_rate: float | None = None):
    """torch's AdamW with the optimizer flags (--learning_rate unless `learning_rate` is given), fused where
    `device` has the kernel: the same update in one pass over all tensors instead of one loop per tensor."""
    return torch.optim.AdamW(parameters, lr=args.learning_rate if learning_rate is None else learning_rate,
                             betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                             eps=args.adam_epsilon, fused=torch.device(device).type in FUSED_ADAMW_DEVICES)


def make_ema(model, args, device):
    """diffusers' EMAModel of `model` with the warm-up flags, on `device`; None without --use_ema. Its foreach
    update does all tensors at once (2 ms -> 0.9 ms per step for the demo UNet on a CPU)."""
    if not args.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    ema = EMAModel(model.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=args.ema_inv_gamma,
                   power=args.ema_power, foreach=True, model_cls=type(model), model_config=model.config)
    ema.to(device)
    return ema


def make_lr_scheduler(args, optimizer, num_batches: int, accelerator, num_epochs: int):
    """(lr scheduler, max_train_steps) before `accelerator.prepare`: the steps of `num_epochs` epochs of a
    loader of `num_batches` once split across the processes, unless --max_train_steps says otherwise. The
    prepared scheduler steps once per process, hence the factor."""
    from diffusers.optimization import get_scheduler

    num_update_steps = updates_per_epoch(math.ceil(num_batches / accelerator.num_processes),
                                         args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or num_epochs * num_update_steps
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes)
    return lr_scheduler, max_train_steps


PRECISION_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def weight_dtype(mixed_precision: str | None) -> torch.dtype:
    """The dtype for frozen weights under `mixed_precision` ("no", "fp16", "bf16"); trained weights stay float32."""
    return PRECISION_DTYPES.get(mixed_precision or "no", torch.float32)


def tracker_config(values: dict) -> dict:
    """Run settings as tracker hyper-parameters: TensorBoard takes only numbers, strings and booleans."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in values.items()}


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
