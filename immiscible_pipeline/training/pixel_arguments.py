"""The flags the pixel trainers (DDIM, consistency models, rectified flow) share, and their recipes: named sets
of defaults for the flags a command line leaves unset.

    add_pixel_training_arguments(parser, RECIPES, output_dir="immiscible-flow", use_ema_help="...")
    ...
    apply_recipe(args, RECIPES, dataset_recipe="cifar10-paper")    # in check_args; says which recipe in args.recipe

Without --dataset_name or --train_data_dir a trainer runs its MNIST demo (recipe "mnist-demo"); with one, the
recipe the script names for datasets (for the DDIM trainer: "diffusers", the defaults of diffusers'
train_unconditional.py, so that its command lines train what they would have trained); `--recipe NAME` picks
another. Flags given on the command line always win.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from .arguments import (LR_SCHEDULERS, add_ema_warmup_arguments, add_evaluation_arguments, add_immiscible_arguments,
                        add_optimizer_arguments, add_output_arguments, add_pixel_data_arguments)

DEMO_RECIPE = "mnist-demo"
# diffusers' train_unconditional.py optimiser and schedule: the DDIM trainer's "diffusers" recipe and the demos
TRAIN_UNCONDITIONAL_OPTIMISER = {"lr_scheduler": "cosine", "adam_beta1": 0.95, "adam_weight_decay": 1e-6}
# DDPM's and torchcfm's CIFAR-10 optimiser: Adam without weight decay, a constant rate after the warm-up
PAPERS_OPTIMISER = {"lr_scheduler": "constant_with_warmup", "adam_beta1": 0.9, "adam_weight_decay": 0.0}


@dataclass(frozen=True)
class Recipe:
    """Defaults for flags left unset; "unet" (a UNet2DModel config) is the model when no
    --model_config_name_or_path is given."""

    description: str
    defaults: dict = field(default_factory=dict)

    def summary(self) -> str:
        """The flag values this recipe fills, for the log at start."""
        def as_flag(flag, value):  # booleans as they are typed: --use_ema / --no-use_ema
            return (f"--{flag}" if value else f"--no-{flag}") if isinstance(value, bool) else f"--{flag} {value}"
        return ", ".join(as_flag(flag, value) for flag, value in self.defaults.items() if flag != "unet")


def add_pixel_training_arguments(parser, recipes: dict, *, output_dir: str, use_ema_help: str):
    """Data, model config, assignment, optimisation, EMA, checkpoints, sample grids, evaluation and --recipe.
    Returns the groups (data, model, train, save, evaluation) for the script's own flags."""
    demo = recipes[DEMO_RECIPE].defaults
    data = add_pixel_data_arguments(parser)
    data.add_argument("--recipe", type=str, default=None, choices=list(recipes),
                      help="Defaults for the flags you leave unset: "
                           + "; ".join(f"{name}: {recipe.description}" for name, recipe in recipes.items())
                           + f". Default: {DEMO_RECIPE} without --dataset_name / --train_data_dir.")
    model = parser.add_argument_group("model")
    model.add_argument("--model_config_name_or_path", type=str, default=None,
                       help="A UNet2DModel config (folder, json file or Hub id). Default: the recipe's UNet.")
    add_immiscible_arguments(parser)

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", type=str, default=output_dir)
    train.add_argument("--seed", type=int, default=None,
                       help="Seed for a reproducible run (without it, one is drawn and recorded in "
                            "training_config.json). Each process draws its noise from a stream of its own.")
    train.add_argument("--train_batch_size", type=int, default=None,
                       help=f"Batch size per process. Default: the recipe's ({demo['train_batch_size']} for the demo).")
    train.add_argument("--num_epochs", type=int, default=None,
                       help="Epochs to train, unless --max_train_steps is given. Default: 100 (the MNIST demo: "
                            f"{demo['max_train_steps']} steps unless one of the two is given).")
    train.add_argument("--max_train_steps", type=int, default=None,
                       help="Optimisation steps; overrides --num_epochs.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")
    train.add_argument("--learning_rate", type=float, default=None, help="Peak learning rate. Default: the recipe's.")
    train.add_argument("--lr_scheduler", type=str, default=None, choices=LR_SCHEDULERS,
                       help="Default: the recipe's.")
    train.add_argument("--lr_warmup_steps", type=int, default=None, help="Warm-up steps. Default: the recipe's.")
    add_optimizer_arguments(train, adam_beta1=None, adam_weight_decay=None)  # None: the recipe's
    train.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="Default: the recipe's if it sets one (diffusers: no, as train_unconditional.py), "
                            "else the value of `accelerate config` / `accelerate launch`.")
    train.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=None, help=use_ema_help)
    add_ema_warmup_arguments(train)
    train.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")

    save = add_output_arguments(parser)
    save.add_argument("--validation_steps", type=int, default=500,
                      help="Save and log a grid of samples every N steps (and at the end).")
    save.add_argument("--num_validation_images", type=int, default=16, help="Images per sample grid.")
    evaluation = add_evaluation_arguments(parser)
    return data, model, train, save, evaluation


def apply_recipe(args, recipes: dict, dataset_recipe: str, num_epochs: int = 100) -> None:
    """Fills the flags left unset (None) from the recipe: --recipe, else "mnist-demo" without a dataset flag,
    else `dataset_recipe`. Sets `args.recipe` (its name) and `args.bundled_demo` (no dataset flag: the bundled
    MNIST). The recipe's step count applies only if --num_epochs was not given either."""
    args.bundled_demo = args.dataset_name is None and args.train_data_dir is None
    args.recipe = args.recipe or (DEMO_RECIPE if args.bundled_demo else dataset_recipe)
    defaults = {flag: value for flag, value in recipes[args.recipe].defaults.items() if flag != "unet"}
    if args.num_epochs is not None:
        defaults.pop("max_train_steps", None)
    for flag, value in defaults.items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    args.num_epochs = args.num_epochs or num_epochs
