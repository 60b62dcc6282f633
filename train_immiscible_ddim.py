#!/usr/bin/env python
"""Unconditional pixel-space diffusion training with Immiscible Diffusion, saved as a DDIMPipeline.

    accelerate launch train_immiscible_ddim.py                                   # bundled MNIST demo, offline
    accelerate launch train_immiscible_ddim.py --dataset_name cifar10 --image_column img --recipe cifar10-paper

Like diffusers' examples/unconditional_image_generation/train_unconditional.py: its command lines work (same
flag names, aliases, or an error saying what to use instead) and, with a dataset, train what it would train
(its defaults: recipe "diffusers"); our own set-ups go by name (--recipe), plus the immiscible flags. The one
change to the usual loop: each micro-batch's noise is drawn and assigned to its images (`noise =
immiscible(clean_images)`) before `add_noise`, and the loss target is built from that assigned noise (the noise
itself for epsilon prediction, the velocity for v-prediction; the clean image, which the demo predicts, needs
no noise).
"""

import argparse

from immiscible_pipeline.training.arguments import check_common_args, min_snr_gamma
from immiscible_pipeline.training.diffusers_example_flags import UNCONDITIONAL_FLAGS, add_diffusers_flags
from immiscible_pipeline.training.hub_publishing import card_description, immiscible_tags
from immiscible_pipeline.training.losses import PREDICTION_TYPES
from immiscible_pipeline.training.pixel_arguments import (PAPERS_OPTIMISER, TRAIN_UNCONDITIONAL_OPTIMISER, Recipe,
                                                          add_pixel_training_arguments, apply_recipe)
from immiscible_pipeline.training.pixel_objectives import DiffusionObjective
from immiscible_pipeline.training.pixel_run import PixelRun, card_settings
from immiscible_pipeline.training.unet_presets import CIFAR10_UNET, DIFFUSERS_UNCONDITIONAL_UNET, MNIST_DEMO_UNET

# Defaults for the flags a command line leaves unset. "diffusers" is what train_unconditional.py would train
# (the default with --dataset_name / --train_data_dir); "cifar10-paper" the DDPM CIFAR-10 set-up the Immiscible
# Diffusion DDIM experiments build on; "mnist-demo" (no dataset flag) finishes in about 5 minutes on 2 CPU cores,
# its settings from the sweep on docs/tuning-log.md.
RECIPES = {
    "mnist-demo": Recipe("the bundled MNIST at 16 px, a small UNet, x0 prediction on a cosine schedule with "
                         "min-SNR weighting", {
                             "unet": MNIST_DEMO_UNET, "train_batch_size": 16, "max_train_steps": 5200,
                             "learning_rate": 1e-3, "lr_warmup_steps": 100, **TRAIN_UNCONDITIONAL_OPTIMISER,
                             "use_ema": True, "prediction_type": "sample", "ddpm_beta_schedule": "squaredcos_cap_v2",
                             "snr_gamma": 0.5}),
    "diffusers": Recipe("diffusers' train_unconditional.py defaults: its UNet at 64 px, batch 16, 1e-4", {
        "unet": DIFFUSERS_UNCONDITIONAL_UNET, "train_batch_size": 16, "learning_rate": 1e-4,
        "lr_warmup_steps": 500, **TRAIN_UNCONDITIONAL_OPTIMISER, "use_ema": False, "prediction_type": "epsilon",
        "ddpm_beta_schedule": "linear", "snr_gamma": 0.0, "mixed_precision": "no"}),
    "cifar10-paper": Recipe("DDPM's CIFAR-10 set-up, which the papers' DDIM runs follow: its UNet at 32 px, batch 128, "
                            "Adam 2e-4 constant after 5000 warm-up steps, EMA", {
                                "unet": CIFAR10_UNET, "train_batch_size": 128, "learning_rate": 2e-4,
                                "lr_warmup_steps": 5000, **PAPERS_OPTIMISER, "use_ema": True,
                                "prediction_type": "epsilon", "ddpm_beta_schedule": "linear", "snr_gamma": 0.0}),
}


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _, model, _, _, evaluation = add_pixel_training_arguments(
        parser, RECIPES, output_dir="immiscible-ddim",
        use_ema_help="Keep an EMA of the weights (with warm-up) and save it. Default: the recipe's (on for the MNIST "
                     "demo and cifar10-paper).")
    model.add_argument("--prediction_type", type=str, default=None, choices=PREDICTION_TYPES,
                       help="What the UNet predicts. Default: the recipe's (sample, the clean image, for the MNIST "
                            "demo; epsilon, the noise, as diffusers' train_unconditional.py, otherwise).")
    model.add_argument("--ddpm_num_steps", type=int, default=1000, help="Diffusion steps of the training scheduler.")
    model.add_argument("--ddpm_beta_schedule", type=str, default=None,
                       choices=["linear", "scaled_linear", "squaredcos_cap_v2"],
                       help="Default: the recipe's (cosine for the MNIST demo, linear otherwise).")
    model.add_argument("--snr_gamma", type=float, default=None,
                       help="Min-SNR loss weighting with this gamma (arXiv 2303.09556; 5.0 is usual), 0 for none. "
                            "Default: the recipe's (0.5 for the MNIST demo, which predicts the clean image: equal "
                            "weights where SNR >= gamma, less at noisier levels; none otherwise).")
    model.add_argument("--ddim_num_inference_steps", type=int, default=50, help="DDIM steps for sample grids.")
    evaluation.add_argument("--eval_inference_steps", type=int, nargs="+", default=None,
                            help="DDIM steps of each evaluation (one FID per entry). Default: "
                                 "--ddim_num_inference_steps.")
    add_diffusers_flags(parser, UNCONDITIONAL_FLAGS)  # train_unconditional.py's command lines work too

    args = parser.parse_args(input_args)
    check_args(args)
    return args


def check_args(args):
    """Everything that can be checked before any data or model is loaded; fills the defaults left unset."""
    check_common_args(args, ("num_epochs", "validation_steps", "num_validation_images", "ddim_num_inference_steps",
                             "resolution", "eval_steps", "eval_num_reference"))
    if args.eval_num_samples < 2:
        raise ValueError(f"--eval_num_samples must be at least 2 (FID needs a covariance), got {args.eval_num_samples}")
    apply_recipe(args, RECIPES, dataset_recipe="diffusers")  # sets args.recipe and args.bundled_demo
    args.snr_gamma = min_snr_gamma(args.snr_gamma)
    args.eval_feature = args.eval_feature or ("classifier" if args.bundled_demo else "inception")
    args.eval_inference_steps = args.eval_inference_steps or [args.ddim_num_inference_steps]
    for flag, values in (("ddim_num_inference_steps", [args.ddim_num_inference_steps]),
                         ("eval_inference_steps", args.eval_inference_steps)):
        for value in values:
            if value < 1:
                raise ValueError(f"--{flag} must be at least 1, got {value}")
            if value > args.ddpm_num_steps:
                raise ValueError(f"--{flag} {value} is more than --ddpm_num_steps {args.ddpm_num_steps}: DDIM "
                                 "samples at a subset of the training timesteps")


def main(args):
    # 1. Set-up: the Accelerator and seeds, the images, the UNet and its EMA, the noise assignment, the optimiser,
    #    the resume position and the evaluator (immiscible_pipeline/training/pixel_run.py).
    run = PixelRun(args, "train_immiscible_ddim", RECIPES, grid_steps=[args.ddim_num_inference_steps])
    objective = DiffusionObjective(args.ddpm_num_steps, args.ddpm_beta_schedule, args.prediction_type, args.snr_gamma)
    accelerator, model, optimizer, lr_scheduler = run.accelerator, run.model, run.optimizer, run.lr_scheduler
    immiscible, ema, progress = run.immiscible, run.ema, run.progress

    # 2. Training loop
    for batch in run.batches():  # epoch after epoch; a resumed run skips what it saw; Ctrl-C ends it
        clean_images = batch["pixel_values"]
        with accelerator.accumulate(model):
            noise = immiscible(clean_images)  # Immiscible Diffusion: fresh noise assigned to these images
            # add_noise at uniform timesteps; the target is built from `noise` (epsilon, velocity or the image)
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

    # 3. Save: the DDIMPipeline with the EMA weights, immiscible_coupling.json, samples.png, training_config.json
    run.save(objective, model_card)


def model_card(args, repo_id, summary, coupling):
    settings = {**card_settings(args, summary, coupling), "prediction type": args.prediction_type,
                "beta schedule": args.ddpm_beta_schedule, "min-SNR gamma": args.snr_gamma or "-",
                "stochastic sampling": ("matched re-noising (immiscible_coupling.json)" if coupling.is_coupled
                                        else "stock")}
    stochastic = ("\n# DDPM or eta > 0 re-noise between steps: pair that noise as training did (immiscible-diffusers)\n"
                  "from immiscible_pipeline import matched_renoise\n\nmatched_renoise(pipeline)  # reads "
                  "immiscible_coupling.json\nimages = pipeline(batch_size=16, num_inference_steps="
                  f"{args.ddim_num_inference_steps}, eta=1.0).images") if coupling.is_coupled else ""
    description = card_description(
        title=f"Immiscible DDIM: {repo_id}",
        summary=(f"An unconditional DDIM model trained with Immiscible Diffusion ({args.immiscible} noise "
                 "assignment, arXiv 2406.12303) using `train_immiscible_ddim.py` from immiscible-diffusers."),
        settings=settings, image="samples.png",
        usage=(f'from diffusers import DiffusionPipeline\n\npipeline = DiffusionPipeline.from_pretrained("{repo_id}")\n'
               f"images = pipeline(batch_size=16, num_inference_steps={args.ddim_num_inference_steps}).images"
               f"{stochastic}"))
    tags = immiscible_tags(args.immiscible) + ["unconditional-image-generation", "ddim", f"scope-{coupling.scope}"]
    return description, tags


if __name__ == "__main__":
    main(parse_args())
