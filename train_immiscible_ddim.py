#!/usr/bin/env python
"""Unconditional pixel-space diffusion training with Immiscible Diffusion, saved as a DDIMPipeline.

    accelerate launch train_immiscible_ddim.py                                   # bundled MNIST demo, offline
    accelerate launch train_immiscible_ddim.py --dataset_name cifar10 --image_column img --resolution 32

Like diffusers' examples/unconditional_image_generation/train_unconditional.py (its command lines work: same
flag names, aliases, or an error saying what to use instead), plus the immiscible flags. The one change to the
usual loop: each micro-batch's noise is drawn and assigned to its images (`noise = immiscible(clean_images)`)
before `add_noise`, and the loss target is built from that assigned noise (the noise itself for epsilon
prediction, the velocity for v-prediction; the clean image, which the demo predicts, needs no noise).
"""

import argparse
import json
from pathlib import Path

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel

from immiscible_pipeline.noise.global_batch import build_immiscible
from immiscible_pipeline.renoise import coupling_of_run
from immiscible_pipeline.training.accelerator_setup import (end_training, make_adamw, make_ema, make_lr_scheduler,
                                                            setup_accelerator, tracker_config)
from immiscible_pipeline.training.arguments import (LR_SCHEDULERS, add_ema_warmup_arguments, add_evaluation_arguments,
                                                    add_immiscible_arguments, add_optimizer_arguments,
                                                    add_output_arguments, add_pixel_data_arguments,
                                                    assignment_batch_warning, check_common_args,
                                                    fill_pixel_defaults, min_snr_gamma)
from immiscible_pipeline.training.checkpoints import epoch_plan, register_checkpoint_hooks, resume
from immiscible_pipeline.training.diffusers_example_flags import (UNCONDITIONAL_FLAGS, add_diffusers_flags,
                                                                  steps_from_epoch_flags)
from immiscible_pipeline.training.hub_publishing import (card_description, immiscible_tags, upload_output_folder,
                                                         write_model_card)
from immiscible_pipeline.training.losses import PREDICTION_TYPES, min_snr_loss
from immiscible_pipeline.training.pixel_trainers import pixel_evaluator, pixel_training_data, record_evaluation
from immiscible_pipeline.training.sample_grids import averaged_weights, image_grid, log_images, sample_images
from immiscible_pipeline.training.step_bookkeeping import TrainingProgress
from immiscible_pipeline.training.unet_presets import CIFAR10_UNET, MNIST_DEMO_UNET, load_unet_config

logger = get_logger(__name__, log_level="INFO")

# Flags left unset take these values: with no dataset flag, a demo on the bundled MNIST sized to finish in a
# few minutes on a CPU; with a dataset, the DDPM CIFAR-10 UNet at its 32 px with DDPM's batch 128 and learning
# rate 2e-4 (train_unconditional.py: its own UNet at 64 px, batch 16, 1e-4), and train_unconditional.py's
# epsilon prediction, linear betas, cosine decay and 500 warm-up steps, for --num_epochs. The demo's settings
# come from a sweep (docs/train-ddim.md): predicting the clean image on a cosine schedule with min-SNR
# weighting raised the share of 1000 samples the MNIST classifier labels with confidence >= 0.9 from 0.44 to
# 0.72-0.73; a UNet without attention that costs half as much per step, at batch 16, keeps that share in about
# 4.5 minutes of training on 2 cores instead of 8; gamma 0.5 instead of 5 lifts it to 0.73-0.75; digits resized
# once instead of at every step leave time for 5200 steps instead of 4400 (4.6 minutes), for 0.74-0.79.
DEMO_DEFAULTS = {"unet": MNIST_DEMO_UNET, "train_batch_size": 16, "max_train_steps": 5200, "learning_rate": 1e-3,
                 "lr_warmup_steps": 100, "use_ema": True, "prediction_type": "sample",
                 "ddpm_beta_schedule": "squaredcos_cap_v2", "snr_gamma": 0.5}
DATASET_DEFAULTS = {"unet": CIFAR10_UNET, "train_batch_size": 128, "max_train_steps": None, "learning_rate": 2e-4,
                    "lr_warmup_steps": 500, "use_ema": False, "prediction_type": "epsilon",
                    "ddpm_beta_schedule": "linear", "snr_gamma": 0.0}


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pixel_data_arguments(parser)

    model = parser.add_argument_group("model and diffusion")
    model.add_argument("--model_config_name_or_path", type=str, default=None,
                       help="A UNet2DModel config (folder, json file or Hub id). Default: a small 16 px grey UNet "
                            "for the MNIST demo, the DDPM CIFAR-10 UNet (32 px RGB) for a dataset.")
    model.add_argument("--prediction_type", type=str, default=None, choices=PREDICTION_TYPES,
                       help="What the UNet predicts. Default: sample (the clean image) for the MNIST demo, epsilon "
                            "(the noise, as diffusers' train_unconditional.py) for a dataset.")
    model.add_argument("--ddpm_num_steps", type=int, default=1000, help="Diffusion steps of the training scheduler.")
    model.add_argument("--ddpm_beta_schedule", type=str, default=None,
                       choices=["linear", "scaled_linear", "squaredcos_cap_v2"],
                       help="Default: squaredcos_cap_v2 (cosine) for the MNIST demo, linear for a dataset.")
    model.add_argument("--snr_gamma", type=float, default=None,
                       help="Min-SNR loss weighting with this gamma (arXiv 2303.09556; 5.0 is usual), 0 for none. "
                            f"Default: {DEMO_DEFAULTS['snr_gamma']:g} for the MNIST demo (it predicts the clean image: "
                            "equal weights where SNR >= gamma, less at noisier levels), none for a dataset.")
    model.add_argument("--ddim_num_inference_steps", type=int, default=50, help="DDIM steps for sample grids.")

    add_immiscible_arguments(parser)

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", type=str, default="immiscible-ddim")
    train.add_argument("--seed", type=int, default=None, help="Seed for a reproducible run (without it, one is drawn "
                       "and recorded in training_config.json). Process p draws its noise from seed + p.")
    train.add_argument("--train_batch_size", type=int, default=None,
                       help=f"Batch size per process. Default: {DEMO_DEFAULTS['train_batch_size']} for the MNIST demo, "
                            f"{DATASET_DEFAULTS['train_batch_size']} for a dataset.")
    train.add_argument("--num_epochs", type=int, default=None,
                       help="Epochs to train, unless --max_train_steps is given. Default: 100 (the MNIST demo: "
                            f"{DEMO_DEFAULTS['max_train_steps']} steps unless one of the two is given).")
    train.add_argument("--max_train_steps", type=int, default=None,
                       help=f"Optimisation steps; overrides --num_epochs. Default: "
                            f"{DEMO_DEFAULTS['max_train_steps']} for the MNIST demo.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")
    train.add_argument("--learning_rate", type=float, default=None,
                       help=f"Peak learning rate. Default: {DEMO_DEFAULTS['learning_rate']:g} for the MNIST demo, "
                            f"{DATASET_DEFAULTS['learning_rate']:g} for a dataset.")
    train.add_argument("--lr_scheduler", type=str, default="cosine", choices=LR_SCHEDULERS)
    train.add_argument("--lr_warmup_steps", type=int, default=None,
                       help=f"Warm-up steps. Default: {DEMO_DEFAULTS['lr_warmup_steps']} for the MNIST demo, "
                            f"{DATASET_DEFAULTS['lr_warmup_steps']} for a dataset.")
    add_optimizer_arguments(train, adam_beta1=0.95, adam_weight_decay=1e-6)  # train_unconditional.py's defaults
    train.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="Default: the value of `accelerate config` / `accelerate launch`.")
    train.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=None,
                       help="Keep an EMA of the weights (with warm-up) and save it. Default: on for the MNIST demo.")
    add_ema_warmup_arguments(train)
    train.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")

    save = add_output_arguments(parser)
    save.add_argument("--validation_steps", type=int, default=500,
                      help="Save and log a grid of samples every N steps (and at the end).")
    save.add_argument("--num_validation_images", type=int, default=16, help="Images per sample grid.")

    evaluation = add_evaluation_arguments(parser)
    evaluation.add_argument("--eval_inference_steps", type=int, default=None,
                            help="DDIM steps per generated image. Default: --ddim_num_inference_steps.")
    add_diffusers_flags(parser, UNCONDITIONAL_FLAGS)  # train_unconditional.py's command lines work too

    args = parser.parse_args(input_args)
    check_args(args)
    return args


def check_args(args):
    """Everything that can be checked before any data or model is loaded; fills the defaults left unset."""
    check_common_args(args, ("num_epochs", "validation_steps", "num_validation_images", "ddim_num_inference_steps",
                             "resolution", "eval_steps", "eval_num_reference", "eval_inference_steps"))
    if args.eval_num_samples < 2:
        raise ValueError(f"--eval_num_samples must be at least 2 (FID needs a covariance), got {args.eval_num_samples}")
    fill_pixel_defaults(args, DEMO_DEFAULTS, DATASET_DEFAULTS)  # sets args.bundled_demo
    args.snr_gamma = min_snr_gamma(args.snr_gamma)
    args.eval_feature = args.eval_feature or ("classifier" if args.bundled_demo else "inception")
    args.eval_inference_steps = args.eval_inference_steps or args.ddim_num_inference_steps
    for flag in ("ddim_num_inference_steps", "eval_inference_steps"):
        if getattr(args, flag) > args.ddpm_num_steps:
            raise ValueError(f"--{flag} {getattr(args, flag)} is more than --ddpm_num_steps {args.ddpm_num_steps}: "
                             "DDIM samples at a subset of the training timesteps")


def main(args):
    # --- setup -------------------------------------------------------------------------------------------
    accelerator, repo_id = setup_accelerator(args)  # also: the same seed everywhere, output dir, Hub repo

    defaults = DEMO_DEFAULTS if args.bundled_demo else DATASET_DEFAULTS
    unet_config = load_unet_config(args.model_config_name_or_path, defaults["unet"], args.resolution)
    args.resolution = unet_config["sample_size"]
    dataset, train_images, loader, dataset_description, _ = pixel_training_data(args, accelerator,
                                                                                unet_config["in_channels"])

    model = UNet2DModel.from_config(unet_config)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        model.enable_xformers_memory_efficient_attention()
    ema = make_ema(model, args, accelerator.device)
    register_checkpoint_hooks(accelerator, model_folder="unet", ema=ema)

    noise_scheduler = DDPMScheduler(num_train_timesteps=args.ddpm_num_steps, beta_schedule=args.ddpm_beta_schedule,
                                    prediction_type=args.prediction_type)
    immiscible = build_immiscible(args.immiscible, args.immiscible_k, args.assignment_cost_dtype,
                                  args.assignment_scope, accelerator)
    if warning := assignment_batch_warning(args.immiscible, args.train_batch_size, args.assignment_scope,
                                           accelerator.num_processes):
        logger.warning(warning)  # linear assignment of batches of one: vanilla training
    optimizer = make_adamw(model.parameters(), args, accelerator.device)

    lr_scheduler, max_train_steps = make_lr_scheduler(args, optimizer, len(loader), accelerator, args.num_epochs)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    parameters = list(model.parameters())  # listed once: walking the modules costs 1% of a small UNet's step
    num_update_steps, num_epochs = epoch_plan(len(loader), args.gradient_accumulation_steps, max_train_steps)
    steps_from_epoch_flags(args, num_update_steps)  # diffusers' --save_images_epochs

    run_config = {key: value for key, value in vars(args).items() if key != "hub_token"}
    if accelerator.is_main_process:
        accelerator.init_trackers("train_immiscible_ddim", config=tracker_config(
            {**run_config, "num_processes": accelerator.num_processes}))
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"{len(dataset)} images, {accelerator.num_processes} process(es), batch {args.train_batch_size} per "
                f"process, total batch {total_batch_size}, {max_train_steps} optimisation steps ({num_epochs} epochs); "
                f"noise assignment: {immiscible!r}, scope {args.assignment_scope}")

    set_seed(args.seed, device_specific=True)  # from here on, different noise and timesteps on each process
    # With --resume_from_checkpoint: weights, EMA, optimizer, scheduler and every process's RNG come back.
    global_step, first_epoch, resume_batches = resume(accelerator, args, num_update_steps)

    # With --eval_steps: the feature network (and the classifier, if not cached) is ready before the first step.
    evaluator = pixel_evaluator(args, unet_config["in_channels"], accelerator, args.eval_inference_steps)

    # --- training ----------------------------------------------------------------------------------------
    progress = TrainingProgress(accelerator, args, lr_scheduler, max_train_steps, global_step, immiscible, ema)
    for epoch in range(first_epoch, num_epochs):
        if progress.stopping:
            break  # resumed from the final step's checkpoint: nothing left to train
        train_images.start_epoch(epoch)  # this epoch's shuffle and augmentations
        model.train()
        batches = loader
        if epoch == first_epoch and resume_batches:
            batches = accelerator.skip_first_batches(loader, resume_batches)  # seen before the checkpoint
        for batch in batches:
            clean_images = batch["pixel_values"]
            with accelerator.accumulate(model):
                noise = immiscible(clean_images)  # Immiscible Diffusion: fresh noise assigned to these images
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean_images.shape[0],),
                                          device=clean_images.device)
                noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
                model_pred = model(noisy_images, timesteps).sample
                loss = min_snr_loss(noise_scheduler, model_pred, clean_images, noise, timesteps,  # target from `noise`
                                    args.snr_gamma)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(parameters, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            # EMA, step count, logs, progress bar; a checkpoint every --checkpointing_steps or on Ctrl-C / SIGTERM
            if progress.after_micro_batch(loss, parameters):
                step = progress.global_step
                if step % args.validation_steps == 0 and not progress.finished and accelerator.is_main_process:
                    pipeline = DDIMPipeline(unet=accelerator.unwrap_model(model),
                                            scheduler=DDIMScheduler.from_config(noise_scheduler.config))
                    with averaged_weights(parameters, ema):
                        save_samples(accelerator, args, pipeline, step,
                                     Path(args.output_dir) / "samples" / f"step-{step:06d}.png")
                if evaluator is not None and (step % args.eval_steps == 0 or progress.finished):
                    evaluate(accelerator, args, evaluator, model, ema, noise_scheduler, step)
            if progress.stopping:
                break
    progress.close()  # after Ctrl-C / SIGTERM: exits with status 130 (the checkpoint is saved, no pipeline)
    global_step = progress.global_step

    # --- save ----------------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(model)
        if ema is not None:
            ema.copy_to(unet.parameters())  # the saved pipeline holds the averaged weights
        pipeline = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(noise_scheduler.config))
        pipeline.save_pretrained(args.output_dir)
        # How a stochastic sampler (DDPM, eta > 0) must re-noise; the grids' DDIM with eta 0 needs nothing
        coupling = coupling_of_run(args.immiscible, args.immiscible_k, args.train_batch_size, args.assignment_scope,
                                   accelerator.num_processes)
        coupling.save(args.output_dir)
        save_samples(accelerator, args, pipeline, global_step, Path(args.output_dir) / "samples.png")
        summary = {**run_config, "num_processes": accelerator.num_processes, "total_batch_size": total_batch_size,
                   "mixed_precision": accelerator.mixed_precision, "global_step": global_step,
                   "dataset": dataset_description, "num_images": len(dataset)}
        (Path(args.output_dir) / "training_config.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.info(f"Saved the DDIMPipeline and a sample grid to {args.output_dir}")
        if args.push_to_hub:
            push_to_hub(args, repo_id, summary, coupling)
    end_training(accelerator)


def evaluate(accelerator, args, evaluator, model, ema, noise_scheduler, step):
    """FID / KID of the current (EMA) weights, logged and appended to eval_history.jsonl."""
    pipeline = DDIMPipeline(unet=accelerator.unwrap_model(model),
                            scheduler=DDIMScheduler.from_config(noise_scheduler.config))
    record_evaluation(accelerator, args, evaluator, pipeline, model, ema, step)


def save_samples(accelerator, args, pipeline, step, path):
    """Samples a grid with a fixed seed (comparable across steps), saves it and logs it."""
    images = sample_images(pipeline, seed=args.seed or 0, batch_size=args.num_validation_images,
                           num_inference_steps=args.ddim_num_inference_steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(path)
    log_images(accelerator, "samples", images, step)


def push_to_hub(args, repo_id, summary, coupling):
    settings = {"assignment": args.immiscible, "k (knn)": args.immiscible_k if args.immiscible == "knn" else "-",
                "assignment scope": coupling.scope, "assignment cost dtype": args.assignment_cost_dtype,
                "dataset": summary["dataset"], "resolution": args.resolution,
                "batch size (total)": summary["total_batch_size"], "processes": summary["num_processes"],
                "steps": summary["global_step"], "learning rate": args.learning_rate, "EMA": bool(args.use_ema),
                "prediction type": args.prediction_type, "beta schedule": args.ddpm_beta_schedule,
                "min-SNR gamma": args.snr_gamma or "-", "mixed precision": summary["mixed_precision"],
                "stochastic sampling": "matched re-noising (immiscible_coupling.json)" if coupling.is_coupled else "stock"}
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
    tags = immiscible_tags(args.immiscible) + ["unconditional-image-generation", "ddim",
                                               f"scope-{coupling.scope}"]
    write_model_card(args.output_dir, repo_id, description, tags, hub_token=args.hub_token)
    upload_output_folder(args.output_dir, repo_id, args.hub_token)


if __name__ == "__main__":
    main(parse_args())
