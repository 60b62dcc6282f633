#!/usr/bin/env python
"""Pixel-space rectified flow (flow matching) with Immiscible Diffusion, saved as a stock diffusers pipeline.

    accelerate launch train_immiscible_flow.py                                   # bundled MNIST demo, offline
    accelerate launch train_immiscible_flow.py --dataset_name cifar10 --image_column img --recipe cifar10-paper

The straight path `x_t = (1 - s) x0 + s z` and the velocity target `z - x0`, with the levels `s` drawn as
diffusers' flow-matching examples draw them (--weighting_scheme, --logit_mean, --logit_std, --mode_scale). The
one change to the loop: each micro-batch's noise is drawn and assigned to its images (`noise =
immiscible(clean_images)`; minibatch optimal transport with linear assignment, the nearest of k draws with KNN)
before it is mixed in, and the target is built from that assigned noise. The saved `DDPMPipeline` with a
`FlowMatchEulerDiscreteScheduler` samples with plain diffusers: deterministic Euler steps from N(0, I), so no
re-noising has to keep the training's coupling. The flags are train_immiscible_ddim.py's where they mean the same.
"""

import argparse

from immiscible_pipeline.training.arguments import check_common_args
from immiscible_pipeline.training.hub_publishing import card_description, immiscible_tags
from immiscible_pipeline.training.pixel_arguments import (PAPERS_OPTIMISER, TRAIN_UNCONDITIONAL_OPTIMISER, Recipe,
                                                          add_pixel_training_arguments, apply_recipe)
from immiscible_pipeline.training.pixel_objectives import PIXEL_FLOW_WEIGHTING, FlowObjective
from immiscible_pipeline.training.pixel_run import PixelRun, card_settings
from immiscible_pipeline.training.unet_presets import CIFAR10_UNET, MNIST_DEMO_UNET

# Defaults for the flags a command line leaves unset. "mnist-demo" (no dataset flag) is the DDIM demo's UNet,
# batch, steps and optimiser with the flow objective and diffusers' SD3 timestep density; "cifar10-paper" (the
# default with a dataset) the set-up of the CIFAR-10 flow-matching runs the follow-up paper builds on (torchcfm:
# uniform levels, batch 128, 2e-4 after 5000 warm-up steps, EMA), on the DDPM CIFAR-10 UNet.
RECIPES = {
    "mnist-demo": Recipe("the bundled MNIST at 16 px, the DDIM demo's small UNet and optimiser, logit-normal levels", {
        "unet": MNIST_DEMO_UNET, "train_batch_size": 16, "max_train_steps": 5200, "learning_rate": 1e-3,
        "lr_warmup_steps": 100, **TRAIN_UNCONDITIONAL_OPTIMISER, "use_ema": True, "weighting_scheme": "logit_normal"}),
    "cifar10-paper": Recipe("CIFAR-10 flow matching as in torchcfm and the follow-up paper: uniform levels, batch "
                            "128, Adam 2e-4 constant after 5000 warm-up steps, EMA, on the DDPM CIFAR-10 UNet", {
                                "unet": CIFAR10_UNET, "train_batch_size": 128, "learning_rate": 2e-4,
                                "lr_warmup_steps": 5000, **PAPERS_OPTIMISER, "use_ema": True,
                                "weighting_scheme": "uniform"}),
}


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _, model, _, save, evaluation = add_pixel_training_arguments(
        parser, RECIPES, output_dir="immiscible-flow",
        use_ema_help="Keep an EMA of the weights (with warm-up) for sampling and saving. Default: the recipe's (on).")
    parser.set_defaults(immiscible_k=4)  # the k of the official flow-matching code (Improved Immiscible Diffusion)
    model.add_argument("--weighting_scheme", type=str, default=None, choices=PIXEL_FLOW_WEIGHTING,
                       help="How the levels s are drawn and weighted, diffusers' names: logit_normal, mode, cosmap, "
                            "sigma_sqrt, or none / uniform (uniform s, no weighting). Default: the recipe's "
                            "(logit_normal for the MNIST demo, as diffusers' SD3 example; uniform for cifar10-paper).")
    model.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit_normal density.")
    model.add_argument("--logit_std", type=float, default=1.0, help="Std of the logit_normal density.")
    model.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the mode density.")
    model.add_argument("--shift", type=float, default=1.0,
                       help="The flow scheduler's timestep shift (1: none; SD3 uses 3 for 1024 px latents).")
    save.add_argument("--validation_inference_steps", type=int, nargs="+", default=[1, 4, 16],
                      help="Euler steps of the sample grids (one block of --num_validation_images each).")
    evaluation.add_argument("--eval_inference_steps", type=int, nargs="+", default=[1, 2, 4, 8],
                            help="Euler steps of each evaluation (one FID per entry).")

    args = parser.parse_args(input_args)
    check_args(args)
    return args


def check_args(args):
    """Everything that can be checked before any data or model is loaded; fills the defaults left unset."""
    check_common_args(args, ("num_epochs", "validation_steps", "num_validation_images", "resolution", "eval_steps",
                             "eval_num_reference"))
    if args.eval_num_samples < 2:
        raise ValueError(f"--eval_num_samples must be at least 2 (FID needs a covariance), got {args.eval_num_samples}")
    for flag in ("validation_inference_steps", "eval_inference_steps"):
        if min(getattr(args, flag)) < 1:
            raise ValueError(f"--{flag} must all be at least 1, got {getattr(args, flag)}")
    if args.logit_std <= 0 or args.shift <= 0:
        raise ValueError(f"--logit_std and --shift must be positive, got {args.logit_std} and {args.shift}")
    apply_recipe(args, RECIPES, dataset_recipe="cifar10-paper")  # sets args.recipe and args.bundled_demo
    args.eval_feature = args.eval_feature or ("classifier" if args.bundled_demo else "inception")


def main(args):
    # 1. Set-up: the Accelerator and seeds, the images, the UNet and its EMA, the noise assignment, the optimiser,
    #    the resume position and the evaluator (immiscible_pipeline/training/pixel_run.py).
    run = PixelRun(args, "train_immiscible_flow", RECIPES, grid_steps=args.validation_inference_steps)
    objective = FlowObjective(args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale,
                              shift=args.shift)
    accelerator, model, optimizer, lr_scheduler = run.accelerator, run.model, run.optimizer, run.lr_scheduler
    immiscible, ema, progress = run.immiscible, run.ema, run.progress

    # 2. Training loop
    for batch in run.batches():  # epoch after epoch; a resumed run skips what it saw; Ctrl-C ends it
        clean_images = batch["pixel_values"]
        with accelerator.accumulate(model):
            noise = immiscible(clean_images)  # Immiscible Diffusion: fresh noise assigned to these images
            # (1 - s) x0 + s z at levels s of the timestep density; the UNet predicts the velocity z - x0
            loss = objective.loss(model, clean_images, noise, progress.global_step, run.max_train_steps)
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
            run.samples_and_evaluations(objective)  # grids every --validation_steps, FID every --eval_steps
    progress.close()  # after Ctrl-C / SIGTERM: exits with status 130 (the checkpoint is saved, no pipeline)

    # 3. Save: a DDPMPipeline with a FlowMatchEulerDiscreteScheduler and the EMA weights, immiscible_coupling.json,
    #    samples.png, training_config.json
    run.save(objective, model_card)


def model_card(args, repo_id, summary, coupling):
    settings = {**card_settings(args, summary, coupling), "objective": "rectified flow (velocity z - x0)",
                "timestep density": args.weighting_scheme, "scheduler shift": args.shift,
                "sampling": "Euler (FlowMatchEulerDiscreteScheduler), deterministic"}
    description = card_description(
        title=f"Immiscible flow matching: {repo_id}",
        summary=(f"An unconditional rectified-flow model trained with Immiscible Diffusion ({args.immiscible} noise "
                 "assignment, arXiv 2406.12303 / 2505.18521) using `train_immiscible_flow.py` from "
                 "immiscible-diffusers. It samples with stock diffusers: Euler steps from Gaussian noise."),
        settings=settings, image="samples.png",
        usage=(f'from diffusers import DiffusionPipeline\n\npipeline = DiffusionPipeline.from_pretrained("{repo_id}")\n'
               "# Euler steps from pure noise to an image; set the count (the pipeline's default is 1000)\n"
               f"images = pipeline(batch_size=16, num_inference_steps={max(args.eval_inference_steps)}).images"))
    tags = immiscible_tags(args.immiscible) + ["unconditional-image-generation", "flow-matching",
                                               f"scope-{coupling.scope}"]
    return description, tags


if __name__ == "__main__":
    main(parse_args())
