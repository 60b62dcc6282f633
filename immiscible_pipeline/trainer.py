"""What the trainer scripts would otherwise copy from each other around their loop: the shared argument
groups, the Accelerator set-up, EMA, the step schedule, resuming, and the per-step log.

    imm = add_immiscible_arguments(parser)                  # --immiscible, --immiscible_k, --assignment_* flags
    add_output_arguments(parser)                            # checkpoints, resume, trackers, hub
    ...
    accelerator, repo_id = setup_accelerator(args)
    lr_scheduler, max_train_steps = make_lr_scheduler(args, optimizer, len(loader), accelerator)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    num_update_steps, num_epochs = epoch_plan(len(loader), args.gradient_accumulation_steps, max_train_steps)
    global_step, first_epoch, resume_batches = resume(accelerator, args, num_update_steps)
    progress = TrainingProgress(accelerator, args, lr_scheduler, max_train_steps, global_step, immiscible, ema)
    for batch in ...:
        ...one micro-batch: forward, backward, optimizer...
        if progress.after_micro_batch(loss, model.parameters()):   # EMA, step, logs, bar, checkpoint, Ctrl-C
            ...validation on progress.global_step...
        if progress.stopping: break
    progress.close()                                        # exit 130 if interrupted

The flag names and meanings are diffusers' (train_unconditional.py, train_text_to_image.py) where they exist.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from .hub import check_hub_token, create_hub_repo
from .linear_assignment import COST_DTYPE_CHOICES
from .training import (StopOnSignal, check_report_to, check_xformers_available, checkpoint_step, find_checkpoint,
                       resume_position, save_checkpoint, updates_per_epoch)

logger = logging.getLogger(__name__)

IMMISCIBLE_METHODS = ("none", "linear", "knn")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


# --- arguments --------------------------------------------------------------------------------------------

def add_immiscible_arguments(parser, sample_name: str = "image"):
    """The noise-assignment flags; returns the argument group so a script can add its own."""
    imm = parser.add_argument_group("immiscible diffusion")
    imm.add_argument("--immiscible", type=str, default="linear", choices=IMMISCIBLE_METHODS,
                     help="Noise assignment: linear (exact batch assignment), knn (nearest of k), none (baseline).")
    imm.add_argument("--immiscible_k", type=int, default=8, help=f"Candidates per {sample_name} for --immiscible knn.")
    imm.add_argument("--assignment_scope", type=str, default="local", choices=["local", "global"],
                     help="local: each process assigns its own batch; global: linear assignment over the batch of "
                          "all processes (communication every step; with one process the same as local).")
    imm.add_argument("--assignment_cost_dtype", type=str, default="auto", choices=COST_DTYPE_CHOICES,
                     help="Precision of the x.n product in the linear assignment cost: auto (bfloat16 on GPUs and "
                          "CPUs with fast bf16, float32 elsewhere), float32 (exact), bfloat16, float16.")
    return imm


def add_pixel_data_arguments(parser):
    """The image-data flags of the pixel-space trainers (diffusers' train_unconditional.py names); with neither
    --dataset_name nor --train_data_dir they train on the bundled MNIST. Returns the group."""
    data = parser.add_argument_group("data (neither --dataset_name nor --train_data_dir: the bundled MNIST demo)")
    data.add_argument("--dataset_name", type=str, default=None, help="A dataset on the Hugging Face Hub.")
    data.add_argument("--dataset_config_name", type=str, default=None, help="The config of --dataset_name.")
    data.add_argument("--train_data_dir", type=str, default=None,
                      help="A folder of images (sub-folders are classes), loaded with datasets' imagefolder.")
    data.add_argument("--image_column", type=str, default="image", help="The dataset column holding the images.")
    data.add_argument("--cache_dir", type=str, default=None, help="Where datasets are downloaded and cached.")
    data.add_argument("--resolution", type=int, default=None,
                      help="Training (and sampling) resolution. Default: the UNet config's sample_size.")
    data.add_argument("--center_crop", action="store_true", help="Centre crop (default: a random crop).")
    data.add_argument("--random_flip", action="store_true", help="Random horizontal flips.")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading processes.")
    return data


def add_evaluation_arguments(parser):
    """FID / KID during training (`TrainingEvaluator`); the script adds its sampler-step flag. Returns the group."""
    evaluation = parser.add_argument_group("evaluation during training (FID / KID against the training data)")
    evaluation.add_argument("--eval_steps", type=int, default=None,
                            help="Compute FID and KID every N steps and at the end (from the EMA weights with --use_ema), "
                                 "log them as eval/* and append them to <output_dir>/eval_history.jsonl. Default: off.")
    evaluation.add_argument("--eval_num_samples", type=int, default=2000, help="Generated images per evaluation.")
    evaluation.add_argument("--eval_feature", type=str, default=None, choices=["classifier", "inception"],
                            help="Feature network: a small classifier trained on the dataset's labels (default for the "
                                 "MNIST demo) or the FID InceptionV3 (default for a dataset; comparable with papers).")
    evaluation.add_argument("--eval_num_reference", type=int, default=10000,
                            help="Training images whose features are the reference (computed once, cached).")
    return evaluation


def assignment_batch_warning(method: str, batch_size: int, scope: str, num_processes: int) -> str | None:
    """A warning when linear assignment sees a single sample: one sample and one noise can only be paired with
    each other, so the run is vanilla training. KNN (nearest of k draws per sample) still works at batch 1."""
    assigned_together = batch_size * (num_processes if scope == "global" else 1)
    if method != "linear" or assigned_together > 1:
        return None
    return (f"--immiscible linear with --train_batch_size {batch_size} per process (--assignment_scope {scope}, "
            f"{num_processes} process(es)) assigns a batch of one sample to its only noise: the assignment does "
            f"nothing and this is vanilla training. For small batches use --immiscible knn (e.g. --immiscible_k 4: "
            f"each sample keeps the nearest of 4 noises).")


def add_optimizer_arguments(group, adam_beta1: float = 0.9, adam_weight_decay: float = 1e-2) -> None:
    """AdamW and gradient clipping flags (defaults: train_text_to_image.py's; train_unconditional.py uses
    beta1 0.95 and weight decay 1e-6)."""
    group.add_argument("--adam_beta1", type=float, default=adam_beta1)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_weight_decay", type=float, default=adam_weight_decay)
    group.add_argument("--adam_epsilon", type=float, default=1e-08)
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping (0 turns it off).")


def add_ema_warmup_arguments(group) -> None:
    """The EMA decay schedule (diffusers' EMAModel with warm-up); the script adds its own --use_ema."""
    group.add_argument("--ema_inv_gamma", type=float, default=1.0, help="EMA warm-up: inverse multiplicative factor.")
    group.add_argument("--ema_power", type=float, default=3 / 4, help="EMA warm-up: exponent.")
    group.add_argument("--ema_max_decay", type=float, default=0.9999, help="EMA decay once warmed up.")


def add_output_arguments(parser, title: str = "checkpoints, samples, logs, hub"):
    """Checkpoints, resume, trackers and the Hub; returns the group so a script can add its sample flags."""
    save = parser.add_argument_group(title)
    save.add_argument("--checkpointing_steps", type=int, default=500, help="Save the training state every N steps.")
    save.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most N checkpoints.")
    save.add_argument("--resume_from_checkpoint", type=str, default=None,
                      help='A checkpoint folder (path or name in --output_dir), or "latest".')
    save.add_argument("--report_to", type=str, default="tensorboard",
                      help='Tracker: "tensorboard", "wandb", "all" or "none".')
    save.add_argument("--logging_dir", type=str, default="logs", help="Tracker logs, inside --output_dir.")
    save.add_argument("--push_to_hub", action="store_true", help="Upload the pipeline and a model card.")
    save.add_argument("--hub_model_id", type=str, default=None, help="Repo name. Default: the output folder's name.")
    save.add_argument("--hub_token", type=str, default=None)
    save.add_argument("--hub_private_repo", action="store_true")
    return save


def check_common_args(args, positive_flags: tuple = ()) -> None:
    """Checks shared by the scripts: data source, flags that must be >= 1, xformers, tracker, hub token."""
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise ValueError("pass either --dataset_name or --train_data_dir, not both")
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        raise ValueError(f"--train_data_dir {args.train_data_dir} is not a directory")
    for flag in ("immiscible_k", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                 "max_train_steps", "checkpoints_total_limit", *positive_flags):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be at least 1, got {value}")
    if args.enable_xformers_memory_efficient_attention:
        check_xformers_available()
    check_report_to(args.report_to)
    check_hub_token(args.report_to, args.hub_token)


# --- set-up, schedule, resume ---------------------------------------------------------------------------

def setup_accelerator(args):
    """The Accelerator (accumulation, precision, tracker, logging folder), the same initial seed on every
    process, the output folder and, with --push_to_hub, the Hub repo (created first so a bad token fails
    early). Returns (accelerator, repo_id or None)."""
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
    if args.seed is not None:
        set_seed(args.seed)  # the same initial weights on every process
    repo_id = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub:
            repo_id = create_hub_repo(args.output_dir, args.hub_model_id, args.hub_token, args.hub_private_repo)
    return accelerator, repo_id


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


def make_ema(model, args, device):
    """diffusers' EMAModel of `model` with the warm-up flags, on `device`; None without --use_ema."""
    if not args.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    ema = EMAModel(model.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=args.ema_inv_gamma,
                   power=args.ema_power, model_cls=type(model), model_config=model.config)
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
    return (global_step, *resume_position(global_step, num_update_steps, args.gradient_accumulation_steps))


def step_logs(loss: float, lr_scheduler, immiscible, ema=None) -> dict:
    """What a trainer logs after each optimisation step: loss, learning rate, the assignment's statistics of
    the last micro-batch and the EMA decay."""
    logs = {"loss": loss, "lr": lr_scheduler.get_last_lr()[0], **immiscible.last_stats.as_dict()}
    if ema is not None:
        logs["ema_decay"] = ema.cur_decay_value
    return logs


class TrainingProgress:
    """The bookkeeping every trainer does after its micro-batch, so that the scripts' loops differ only in how
    the loss is made: the loss summed over gradient accumulation, then at each optimisation step the EMA step,
    the step counter, the logs and progress bar, a checkpoint every --checkpointing_steps or when Ctrl-C /
    SIGTERM arrives (on every process together), and when to stop.

        progress = TrainingProgress(accelerator, args, lr_scheduler, max_train_steps, global_step, immiscible, ema)
        for batch in batches:
            ...forward, backward, optimizer step...
            if progress.after_micro_batch(loss, model.parameters()):
                ...validation at progress.global_step...
            if progress.stopping:
                break
        progress.close()   # after an interruption: trackers closed, exit status 130

    `after_micro_batch` returns True after an optimisation step that ran to completion (not one cut short by
    a signal): the moment for validation and evaluation. Call it on every process (it is a collective)."""

    def __init__(self, accelerator, args, lr_scheduler, max_train_steps: int, global_step: int, immiscible,
                 ema=None):
        from tqdm.auto import tqdm

        self.accelerator, self.args, self.lr_scheduler = accelerator, args, lr_scheduler
        self.immiscible, self.ema = immiscible, ema
        self.max_train_steps, self.global_step = max_train_steps, global_step
        self.train_loss, self.interrupted = 0.0, False
        self.bar = tqdm(range(max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
        self.stop = StopOnSignal(accelerator)

    @property
    def finished(self) -> bool:
        return self.global_step >= self.max_train_steps

    @property
    def stopping(self) -> bool:
        """True once the loop should end: the last step is done, or a signal asked to stop (checkpoint saved)."""
        return self.interrupted or self.finished

    def after_micro_batch(self, loss: torch.Tensor, parameters) -> bool:
        accelerator, args = self.accelerator, self.args
        self.train_loss += accelerator.reduce(loss.detach(), "mean").item() / args.gradient_accumulation_steps
        if not accelerator.sync_gradients:
            return False
        if self.ema is not None:
            self.ema.step(parameters)
        self.global_step += 1
        self.bar.update(1)
        logs = step_logs(self.train_loss, self.lr_scheduler, self.immiscible, self.ema)
        accelerator.log(logs, step=self.global_step)
        self.bar.set_postfix(loss=self.train_loss, lr=logs["lr"])
        self.train_loss = 0.0
        # A signal on any process: every process saves this step's checkpoint, then leaves (at the last step:
        # the run just finishes).
        self.interrupted = self.stop.requested() and not self.finished
        if self.global_step % args.checkpointing_steps == 0 or self.interrupted:
            save_checkpoint(accelerator, args.output_dir, self.global_step, args.checkpoints_total_limit)
        return not self.interrupted

    def close(self) -> None:
        """Closes the bar and puts the signal handlers back; after an interruption, ends the process (130)."""
        self.bar.close()
        if self.interrupted:
            self.stop.exit(self.global_step, self.args.output_dir)  # its checkpoint is saved; no pipeline
        self.stop.restore()


# --- the pixel-space trainers (DDIM, consistency models) --------------------------------------------------

def pixel_training_data(args, accelerator, channels: int, label_column: str | None = None):
    """The images of --dataset_name / --train_data_dir, or the bundled MNIST demo (said in the log), as seeded
    `TrainImages` and their loader; the main process downloads and caches first. With `label_column` (a
    ClassLabel column, checked) batches also hold the labels. Returns (dataset, train_images, loader,
    description of the source, class names or None)."""
    from .data import (ImageTransform, TrainImages, class_label_names, describe_dataset, load_image_dataset,
                       train_dataloader)

    description = describe_dataset(args.dataset_name, args.train_data_dir)
    if args.bundled_demo and accelerator.is_main_process:
        logger.info(f"No --dataset_name or --train_data_dir: training on {description}, 50,000 digits at "
                    f"{args.resolution} px with a small UNet for {args.max_train_steps} steps, a demo that needs no "
                    "download and finishes in minutes on a CPU. Pass --dataset_name or --train_data_dir to train "
                    "on your own images.")
    elif accelerator.is_main_process:
        logger.info(f"Training on {description} at {args.resolution} px.")
    with accelerator.main_process_first():  # one process downloads and caches, the others then read the cache
        dataset = load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir)
    class_names = class_label_names(dataset, label_column) if label_column is not None else None
    transform = ImageTransform(args.resolution, channels, args.center_crop, args.random_flip)
    data_seed = args.seed if args.seed is not None else 0  # the same shuffle on every process
    train_images = TrainImages(dataset, args.image_column, transform, seed=data_seed,
                               keep_columns=[label_column] if label_column is not None else ())
    loader = train_dataloader(train_images, args.train_batch_size, args.dataloader_num_workers)
    return dataset, train_images, loader, description, class_names


def pixel_evaluator(args, channels: int, accelerator, num_inference_steps: int):
    """The `TrainingEvaluator` of --eval_steps (None without it), against the training data (MNIST for the
    demo), prepared now: the feature network (the classifier is trained if not cached) before the first step."""
    if args.eval_steps is None:
        return None
    from .evaluation import TrainingEvaluator
    from .reference_data import ReferenceSpec

    reference = ReferenceSpec() if args.bundled_demo else ReferenceSpec(
        args.dataset_name or args.train_data_dir, config_name=args.dataset_config_name, image_column=args.image_column)
    evaluator = TrainingEvaluator(reference, args.eval_num_samples, args.eval_feature, num_inference_steps,
                                  batch_size=args.train_batch_size, seed=args.seed or 0,
                                  num_reference=args.eval_num_reference, progress=True)
    evaluator.prepare(args.resolution, channels, accelerator)
    return evaluator
