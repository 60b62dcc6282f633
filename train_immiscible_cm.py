#!/usr/bin/env python
"""Consistency training from scratch with Immiscible Diffusion, saved as a ConsistencyModelPipeline.

    accelerate launch train_immiscible_cm.py                                     # bundled MNIST demo, offline
    accelerate launch train_immiscible_cm.py --dataset_name cifar10 --image_column img --resolution 32

Improved consistency training (Song & Dhariwal 2023): no teacher; the target is the online network under
stop-gradient; pseudo-Huber loss; a curriculum doubling the noise levels from 10 to 1280; log-normal levels.
The parameterisation is that of diffusers' CMStochasticIterativeScheduler, so the stock pipeline samples the
trained model in one or two steps. The one change to the loop: each micro-batch's noise is drawn and assigned
to its images (`noise = immiscible(clean_images)`), and that one noise makes both noisy inputs,
`x + sigma_{n+1} z` and `x + sigma_n z`. The flags are train_immiscible_ddim.py's where they mean the same.
"""

import argparse

from accelerate.logging import get_logger

from immiscible_pipeline.renoise import warn_if_independent
from immiscible_pipeline.training.arguments import check_common_args
from immiscible_pipeline.training.consistency_training import LOSSES, SAMPLER_LEVELS, ConsistencyRecipe
from immiscible_pipeline.training.hub_publishing import card_description, immiscible_tags
from immiscible_pipeline.training.pixel_arguments import (PAPERS_OPTIMISER, Recipe, add_pixel_training_arguments,
                                                          apply_recipe)
from immiscible_pipeline.training.pixel_objectives import ConsistencyObjective
from immiscible_pipeline.training.pixel_run import PixelRun, card_settings
from immiscible_pipeline.training.unet_presets import CIFAR10_UNET, MNIST_UNET

# Defaults for the flags a command line leaves unset: "mnist-demo" without a dataset flag (sized for a CPU; its
# small UNet trains without dropout, since in a few thousand steps it underfits rather than overfits),
# "ict-cifar10" with one: the DDPM CIFAR-10 UNet with iCT's CIFAR-10 dropout (0.3) and learning rate (1e-4).
RECIPES = {
    "mnist-demo": Recipe("the bundled MNIST at 16 px, a small UNet, 1000 steps of batch 64", {
        "unet": MNIST_UNET, "train_batch_size": 64, "max_train_steps": 1000, "learning_rate": 1e-3,
        "lr_warmup_steps": 100, **PAPERS_OPTIMISER, "dropout": 0.0}),
    "ict-cifar10": Recipe("improved consistency training's CIFAR-10 settings on the DDPM CIFAR-10 UNet (32 px)", {
        "unet": CIFAR10_UNET, "train_batch_size": 128, "learning_rate": 1e-4, "lr_warmup_steps": 500,
        **PAPERS_OPTIMISER, "dropout": 0.3}),
}
logger = get_logger(__name__, log_level="INFO")

GRID_STEPS = (1, 2)  # samples.png: one-step and two-step samples of the same noise


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data, model, _, _, evaluation = add_pixel_training_arguments(
        parser, RECIPES, output_dir="immiscible-cm",
        use_ema_help="Keep an EMA of the weights (with warm-up) for sampling and saving (iCT samples the EMA). "
                     "Default: on.")
    parser.set_defaults(immiscible_k=4, use_ema=True)  # the follow-up paper's k for CM
    data.add_argument("--class_conditional", action="store_true",
                      help="Condition on a ClassLabel column (--label_column): a class embedding in the UNet, "
                           "noise assigned within each class, `class_labels=` at sampling.")
    data.add_argument("--label_column", type=str, default="label",
                      help="The ClassLabel column for --class_conditional.")

    defaults = ConsistencyRecipe()
    model.add_argument("--dropout", type=float, default=None,
                       help="UNet dropout. Default: the recipe's (0.3 with a dataset, as iCT on CIFAR-10; 0 for the "
                            "MNIST demo).")
    model.add_argument("--sigma_min", type=float, default=defaults.sigma_min, help="Smallest noise level.")
    model.add_argument("--sigma_max", type=float, default=defaults.sigma_max, help="Largest noise level.")
    model.add_argument("--sigma_data", type=float, default=defaults.sigma_data, help="Data standard deviation.")
    model.add_argument("--rho", type=float, default=defaults.rho, help="Karras schedule exponent.")
    model.add_argument("--curriculum_start", type=int, default=defaults.curriculum_start,
                       help="Noise levels at the start of training (doubled over training up to --curriculum_end).")
    model.add_argument("--curriculum_end", type=int, default=defaults.curriculum_end,
                       help="Noise levels at the end of training.")
    model.add_argument("--p_mean", type=float, default=defaults.p_mean, help="Log-normal level distribution: mean.")
    model.add_argument("--p_std", type=float, default=defaults.p_std, help="Log-normal level distribution: std.")
    model.add_argument("--loss", type=str, default=defaults.loss, choices=LOSSES,
                       help="Distance between the online and target outputs.")
    model.add_argument("--huber_c", type=float, default=None,
                       help="Pseudo-Huber constant. Default: 0.00054 * sqrt(values per image), as in iCT.")

    evaluation.add_argument("--eval_inference_steps", type=int, nargs="+", default=[1, 2],
                            help="Sampler steps of each evaluation (one FID per entry).")
    evaluation.add_argument("--renoise", type=str, default="matched", choices=["matched", "independent"],
                            help="How sample grids and evaluations re-noise between consistency steps (multistep "
                                 "sampling): matched (default) pairs the injected noise with the clean estimates as "
                                 "training paired noise with images (immiscible_pipeline.matched_renoise); "
                                 "independent is stock diffusers. No effect with --immiscible none.")

    args = parser.parse_args(input_args)
    check_args(args)
    return args


def check_args(args):
    """Everything that can be checked before any data or model is loaded; fills the defaults left unset."""
    check_common_args(args, ("num_epochs", "validation_steps", "num_validation_images", "resolution", "eval_steps",
                             "eval_num_reference", "curriculum_start"))
    if args.eval_num_samples < 2:
        raise ValueError(f"--eval_num_samples must be at least 2 (FID needs a covariance), got {args.eval_num_samples}")
    if not all(1 <= steps <= SAMPLER_LEVELS for steps in args.eval_inference_steps):
        raise ValueError(f"--eval_inference_steps must be between 1 and {SAMPLER_LEVELS} (the sampler's noise levels), "
                         f"got {args.eval_inference_steps}")
    apply_recipe(args, RECIPES, dataset_recipe="ict-cifar10")  # sets args.recipe and args.bundled_demo
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    args.consistency = ConsistencyRecipe(args.sigma_min, args.sigma_max, args.sigma_data, args.rho,
                                         args.curriculum_start, args.curriculum_end, args.p_mean, args.p_std,
                                         args.loss, args.huber_c)
    args.eval_feature = args.eval_feature or ("classifier" if args.bundled_demo else "inception")


def main(args):
    # 1. Set-up: the Accelerator and seeds, the images (and labels), the UNet and its EMA, the noise assignment,
    #    the optimiser, the resume position and the evaluator (immiscible_pipeline/training/pixel_run.py).
    run = PixelRun(args, "train_immiscible_cm", RECIPES, grid_steps=GRID_STEPS,
                   unet_overrides={"dropout": args.dropout})
    # iCT with the scalings of the saved pipeline's scheduler, so that the stock pipeline samples what was trained
    objective = ConsistencyObjective(args.consistency, unwrap=run.accelerator.unwrap_model)
    accelerator, model, optimizer, lr_scheduler = run.accelerator, run.model, run.optimizer, run.lr_scheduler
    immiscible, ema, progress = run.immiscible, run.ema, run.progress
    recipe = args.consistency
    if accelerator.is_main_process:
        warn_if_independent(run.coupling, objective.scheduler, args.renoise, num_inference_steps=max(GRID_STEPS))
    logger.info(f"Noise levels {recipe.num_levels(0, run.max_train_steps)} -> "
                f"{recipe.num_levels(run.max_train_steps - 1, run.max_train_steps)} over the run's steps")

    # 2. Training loop
    for batch in run.batches():  # epoch after epoch; a resumed run skips what it saw; Ctrl-C ends it
        clean_images = batch["pixel_values"]
        class_labels = run.class_labels(batch)  # None unless --class_conditional
        with accelerator.accumulate(model):
            # Immiscible Diffusion: fresh noise assigned to these images (within each class if conditional)
            noise = immiscible(clean_images, groups=class_labels)
            # f(x + sigma_{n+1} z) against stop-gradient f(x + sigma_n z), the same z, adjacent levels of the
            # curriculum's current discretisation
            loss = objective.loss(model, clean_images, noise, progress.global_step, run.max_train_steps, class_labels)
            accelerator.backward(loss)
            run.clip_gradients()
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        progress.add_loss(loss)
        if accelerator.sync_gradients:  # an optimisation step is complete
            if ema is not None:
                ema.step(run.parameters)
            progress.end_step()  # step count, logs, progress bar
            progress.checkpoint_if_due()  # every --checkpointing_steps, and at once on Ctrl-C / SIGTERM
            run.samples_and_evaluations(objective)  # 1- and 2-step grids, FID at each --eval_inference_steps
    progress.close()  # after Ctrl-C / SIGTERM: exits with status 130 (the checkpoint is saved, no pipeline)

    # 3. Save: the ConsistencyModelPipeline (stock scheduler) with the EMA weights, immiscible_coupling.json,
    #    samples.png, training_config.json
    run.save(objective, model_card, {"final_num_levels": recipe.num_levels(max(progress.global_step - 1, 0),
                                                                          run.max_train_steps)})


def model_card(args, repo_id, summary, coupling):
    settings = {**card_settings(args, summary, coupling), "class-conditional": bool(args.class_conditional),
                "loss": args.loss, "noise levels": f"{args.curriculum_start} -> {args.curriculum_end}",
                "sigma range": f"[{args.sigma_min}, {args.sigma_max}]", "dropout": args.dropout,
                "multistep sampling": ("matched re-noising (immiscible_coupling.json)" if coupling.is_coupled
                                       else "stock")}
    labels = ", class_labels=[0] * 16" if args.class_conditional else ""
    matched = ("# trained with noise assignment: re-noise between steps the same way (immiscible-diffusers)\n"
               "from immiscible_pipeline import matched_renoise\n\nmatched_renoise(pipeline)  # reads "
               "immiscible_coupling.json\n") if coupling.is_coupled else ""
    description = card_description(
        title=f"Immiscible consistency model: {repo_id}",
        summary=(f"A consistency model trained from scratch by improved consistency training with Immiscible "
                 f"Diffusion ({args.immiscible} noise assignment, arXiv 2406.12303) using `train_immiscible_cm.py` "
                 "from immiscible-diffusers. It samples in one step, or better in two."),
        settings=settings, image="samples.png",
        usage=(f'from diffusers import DiffusionPipeline\n\npipeline = DiffusionPipeline.from_pretrained("{repo_id}")\n'
               f"one_step = pipeline(batch_size=16, num_inference_steps=1{labels}).images\n{matched}"
               f"two_step = pipeline(batch_size=16, num_inference_steps=2{labels}).images\n"
               f"# through sigma 0.82 instead of the grid's 2.24: as good or better once trained (MNIST)\n"
               f"two_step = pipeline(batch_size=16, num_inference_steps=None, timesteps="
               f"{args.consistency.two_step_timesteps()}{labels}).images"))
    task = "class-conditional-image-generation" if args.class_conditional else "unconditional-image-generation"
    tags = immiscible_tags(args.immiscible) + [task, "consistency-models", f"scope-{coupling.scope}"]
    return description, tags


if __name__ == "__main__":
    main(parse_args())
