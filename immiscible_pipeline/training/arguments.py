"""The command-line flags the trainers share, in argparse groups, and the checks that name the flag at fault.

    imm = add_immiscible_arguments(parser)      # --immiscible, --immiscible_k, --assignment_* flags
    add_output_arguments(parser)                # checkpoints, resume, trackers, hub
    ...
    check_common_args(args)                     # data source, counts >= 1, xformers, tracker, hub token

The flag names and meanings are diffusers' (train_unconditional.py, train_text_to_image.py) where they exist.
"""

from __future__ import annotations

import os

from ..noise.global_batch import AUTO_GLOBAL_MAX_BATCH, resolve_scope, SCOPES
from ..noise.linear_assignment import COST_DTYPE_CHOICES
from .hub_publishing import check_hub_token


IMMISCIBLE_METHODS = ("none", "linear", "knn")


LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def add_immiscible_arguments(parser, sample_name: str = "image"):
    """The noise-assignment flags; returns the argument group so a script can add its own."""
    imm = parser.add_argument_group("immiscible diffusion")
    imm.add_argument("--immiscible", type=str, default="linear", choices=IMMISCIBLE_METHODS,
                     help="Noise assignment: linear (exact batch assignment), knn (nearest of k), none (baseline).")
    imm.add_argument("--immiscible_k", type=int, default=8, help=f"Candidates per {sample_name} for --immiscible knn.")
    imm.add_argument("--assignment_scope", type=str, default="auto", choices=SCOPES,
                     help=f"With several processes: global = one linear assignment over the batch of all processes "
                          f"(the official SD code's mode; communication every step); local = each process assigns "
                          f"its own batch; auto (default) = global while the batch of all processes has at most "
                          f"{AUTO_GLOBAL_MAX_BATCH} samples, local beyond, where the exact solve (on the CPU, while "
                          f"the GPUs wait) grows past 0.3 s per step (docs/benchmarks.md). One process: all alike.")
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
                            help="Compute FID and KID every N steps and at the end (from the EMA weights with "
                                 "--use_ema), log them as eval/<n>_step/* and append them to "
                                 "<output_dir>/eval_history.jsonl. Default: off.")
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
    global_batch = resolve_scope(scope, batch_size, num_processes) == "global"
    assigned_together = batch_size * (num_processes if global_batch else 1)
    if method != "linear" or assigned_together > 1:
        return None
    return (f"--immiscible linear with --train_batch_size {batch_size} per process (--assignment_scope {scope}, "
            f"{num_processes} process(es)) assigns a batch of one sample to its only noise: the assignment does "
            f"nothing and this is vanilla training. For small batches use --immiscible knn (e.g. --immiscible_k 4: "
            f"each sample keeps the nearest of 4 noises).")


def add_optimizer_arguments(group, adam_beta1: float | None = 0.9, adam_weight_decay: float | None = 1e-2) -> None:
    """AdamW and gradient clipping flags (defaults: train_text_to_image.py's; the pixel trainers pass None and
    take beta1 and weight decay from their recipe)."""
    from_recipe = "Default: the recipe's."  # None: a trainer with recipes fills it (pixel_arguments.apply_recipe)
    group.add_argument("--adam_beta1", type=float, default=adam_beta1, help=from_recipe if adam_beta1 is None else None)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_weight_decay", type=float, default=adam_weight_decay,
                       help=from_recipe if adam_weight_decay is None else None)
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
    save.add_argument("--overwrite_output_dir", action="store_true",
                      help="Start a new run in an --output_dir that holds an earlier run's checkpoints or "
                           "eval_history.jsonl: delete those first. Without it (or --resume_from_checkpoint) such a "
                           "folder is refused.")
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


def min_snr_gamma(value: float | None) -> float | None:
    """--snr_gamma as the loss takes it: None (plain MSE) for unset or 0, the value if positive."""
    if value is not None and value < 0:
        raise ValueError(f"--snr_gamma must be positive, or 0 for no min-SNR weighting; got {value}")
    return value or None  # 0 would clamp every weight to 0: a loss of zero


def check_xformers_available() -> None:
    """Raises a ValueError naming the flag if xformers cannot be used."""
    from diffusers.utils.import_utils import is_xformers_available

    if not is_xformers_available():
        raise ValueError("--enable_xformers_memory_efficient_attention needs the xformers package, which is not "
                         "installed: pip install xformers (for your torch and CUDA), or drop the flag")


def check_report_to(report_to: str) -> None:
    """Raises a ValueError naming the flag if the requested tracker is not installed."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    needed = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    for name in (needed if report_to == "all" else [report_to]):
        if name in needed and not needed[name]():
            raise ValueError(f"--report_to {report_to} needs {name}, which is not installed: pip install {name}")
