#!/usr/bin/env python
"""Unconditional pixel-space diffusion training with Immiscible Diffusion, saved as a DDIMPipeline.

    accelerate launch train_immiscible_ddim.py                                   # bundled MNIST demo, offline
    accelerate launch train_immiscible_ddim.py --dataset_name cifar10 --image_column img --resolution 32

Like diffusers' examples/unconditional_image_generation/train_unconditional.py (same flag names), plus the
immiscible flags. The one change to the usual loop: each micro-batch's noise is drawn and assigned to its
images (`noise = immiscible(clean_images)`) before `add_noise`, and that assigned noise is the loss target.
"""

import argparse
import json
import logging
import math
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from immiscible_pipeline.data import (ImageTransform, TrainImages, describe_dataset, load_image_dataset,
                                      train_dataloader)
from immiscible_pipeline.distributed import build_immiscible
from immiscible_pipeline.hub import (card_description, check_hub_token, create_hub_repo, immiscible_tags,
                                     upload_output_folder, write_model_card)
from immiscible_pipeline.pixel_unet import CIFAR10_UNET, MNIST_UNET, load_unet_config
from immiscible_pipeline.training import (PREDICTION_TYPES, averaged_weights, check_report_to,
                                          check_xformers_available, checkpoint_step, diffusion_loss,
                                          find_checkpoint, image_grid, log_images, register_checkpoint_hooks,
                                          resume_position, sample_images, save_checkpoint, tracker_config,
                                          updates_per_epoch)

logger = get_logger(__name__, log_level="INFO")

# Flags left unset take these values: with no dataset flag, a demo on the bundled MNIST sized to finish in a
# few minutes on a CPU; with a dataset, the DDPM CIFAR-10 UNet at its 32 px, trained for --num_epochs.
DEMO_DEFAULTS = {"unet": MNIST_UNET, "max_train_steps": 1500, "learning_rate": 3e-4, "lr_warmup_steps": 100,
                 "use_ema": True}
DATASET_DEFAULTS = {"unet": CIFAR10_UNET, "max_train_steps": None, "learning_rate": 2e-4, "lr_warmup_steps": 500,
                    "use_ema": False}


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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

    model = parser.add_argument_group("model and diffusion")
    model.add_argument("--model_config_name_or_path", type=str, default=None,
                       help="A UNet2DModel config (folder, json file or Hub id). Default: a small 16 px grey UNet "
                            "for the MNIST demo, the DDPM CIFAR-10 UNet (32 px RGB) for a dataset.")
    model.add_argument("--prediction_type", type=str, default="epsilon", choices=PREDICTION_TYPES)
    model.add_argument("--ddpm_num_steps", type=int, default=1000, help="Diffusion steps of the training scheduler.")
    model.add_argument("--ddpm_beta_schedule", type=str, default="linear",
                       choices=["linear", "scaled_linear", "squaredcos_cap_v2"])
    model.add_argument("--ddim_num_inference_steps", type=int, default=50, help="DDIM steps for sample grids.")

    imm = parser.add_argument_group("immiscible diffusion")
    imm.add_argument("--immiscible", type=str, default="linear", choices=["none", "linear", "knn"],
                     help="Noise assignment: linear (exact batch assignment), knn (nearest of k), none (baseline).")
    imm.add_argument("--immiscible_k", type=int, default=8, help="Candidates per image for --immiscible knn.")
    imm.add_argument("--assignment_scope", type=str, default="local", choices=["local", "global"],
                     help="local: each process assigns its own batch; global: linear assignment over the batch of "
                          "all processes (communication every step; with one process the same as local).")
    imm.add_argument("--assignment_cost_dtype", type=str, default="float32", choices=["float32", "bfloat16", "float16"],
                     help="Precision of the x.n product in the linear assignment cost (float32 is exact).")

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", type=str, default="immiscible-ddim")
    train.add_argument("--seed", type=int, default=None, help="Seed for a reproducible run.")
    train.add_argument("--train_batch_size", type=int, default=128, help="Batch size per process.")
    train.add_argument("--num_epochs", type=int, default=100)
    train.add_argument("--max_train_steps", type=int, default=None,
                       help="Optimisation steps; overrides --num_epochs. Default: 1500 for the MNIST demo.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")
    train.add_argument("--learning_rate", type=float, default=None,
                       help="Peak learning rate. Default: 3e-4 for the MNIST demo, 2e-4 for a dataset.")
    train.add_argument("--lr_scheduler", type=str, default="cosine",
                       choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                "constant_with_warmup"])
    train.add_argument("--lr_warmup_steps", type=int, default=None,
                       help="Warm-up steps. Default: 100 for the MNIST demo, 500 for a dataset.")
    train.add_argument("--adam_beta1", type=float, default=0.95)
    train.add_argument("--adam_beta2", type=float, default=0.999)
    train.add_argument("--adam_weight_decay", type=float, default=1e-6)
    train.add_argument("--adam_epsilon", type=float, default=1e-08)
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping (0 turns it off).")
    train.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="Default: the value of `accelerate config` / `accelerate launch`.")
    train.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=None,
                       help="Keep an EMA of the weights (with warm-up) and save it. Default: on for the MNIST demo.")
    train.add_argument("--ema_inv_gamma", type=float, default=1.0, help="EMA warm-up: inverse multiplicative factor.")
    train.add_argument("--ema_power", type=float, default=3 / 4, help="EMA warm-up: exponent.")
    train.add_argument("--ema_max_decay", type=float, default=0.9999, help="EMA decay once warmed up.")
    train.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")

    save = parser.add_argument_group("checkpoints, samples, logs, hub")
    save.add_argument("--checkpointing_steps", type=int, default=500, help="Save the training state every N steps.")
    save.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most N checkpoints.")
    save.add_argument("--resume_from_checkpoint", type=str, default=None,
                      help='A checkpoint folder (path or name in --output_dir), or "latest".')
    save.add_argument("--validation_steps", type=int, default=500,
                      help="Save and log a grid of samples every N steps (and at the end).")
    save.add_argument("--num_validation_images", type=int, default=16, help="Images per sample grid.")
    save.add_argument("--report_to", type=str, default="tensorboard",
                      help='Tracker: "tensorboard", "wandb", "all" or "none".')
    save.add_argument("--logging_dir", type=str, default="logs", help="Tracker logs, inside --output_dir.")
    save.add_argument("--push_to_hub", action="store_true", help="Upload the pipeline and a model card.")
    save.add_argument("--hub_model_id", type=str, default=None, help="Repo name. Default: the output folder's name.")
    save.add_argument("--hub_token", type=str, default=None)
    save.add_argument("--hub_private_repo", action="store_true")

    args = parser.parse_args(input_args)
    check_args(args)
    return args


def check_args(args):
    """Everything that can be checked before any data or model is loaded; fills the defaults left unset."""
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise ValueError("pass either --dataset_name or --train_data_dir, not both")
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        raise ValueError(f"--train_data_dir {args.train_data_dir} is not a directory")
    for flag in ("immiscible_k", "train_batch_size", "num_epochs", "gradient_accumulation_steps",
                 "checkpointing_steps", "validation_steps", "num_validation_images", "ddim_num_inference_steps",
                 "max_train_steps", "checkpoints_total_limit", "resolution"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be at least 1, got {value}")
    if args.enable_xformers_memory_efficient_attention:
        check_xformers_available()
    check_report_to(args.report_to)
    check_hub_token(args.report_to, args.hub_token)
    args.bundled_demo = args.dataset_name is None and args.train_data_dir is None
    for flag, value in (DEMO_DEFAULTS if args.bundled_demo else DATASET_DEFAULTS).items():
        if flag != "unet" and getattr(args, flag) is None:
            setattr(args, flag, value)


def main(args):
    # --- setup -------------------------------------------------------------------------------------------
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if args.seed is not None:
        set_seed(args.seed)  # the same initial weights on every process
    repo_id = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub:
            repo_id = create_hub_repo(args.output_dir, args.hub_model_id, args.hub_token, args.hub_private_repo)

    defaults = DEMO_DEFAULTS if args.bundled_demo else DATASET_DEFAULTS
    unet_config = load_unet_config(args.model_config_name_or_path, defaults["unet"], args.resolution)
    args.resolution = unet_config["sample_size"]
    dataset_description = describe_dataset(args.dataset_name, args.train_data_dir)
    if args.bundled_demo:
        logger.info(f"No --dataset_name or --train_data_dir: training on {dataset_description}, 50,000 digits at "
                    f"{args.resolution} px with a small UNet for {args.max_train_steps} steps, a demo that needs no "
                    "download and finishes in minutes on a CPU. Pass --dataset_name or --train_data_dir to train "
                    "on your own images.")
    else:
        logger.info(f"Training on {dataset_description} at {args.resolution} px.")

    dataset = load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir)
    transform = ImageTransform(args.resolution, unet_config["in_channels"], args.center_crop, args.random_flip)
    data_seed = args.seed if args.seed is not None else 0  # the same shuffle on every process
    train_images = TrainImages(dataset, args.image_column, transform, seed=data_seed)
    loader = train_dataloader(train_images, args.train_batch_size, args.dataloader_num_workers)

    model = UNet2DModel.from_config(unet_config)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        model.enable_xformers_memory_efficient_attention()
    ema = None
    if args.use_ema:
        ema = EMAModel(model.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=args.ema_inv_gamma,
                       power=args.ema_power, model_cls=UNet2DModel, model_config=model.config)
        ema.to(accelerator.device)
    register_checkpoint_hooks(accelerator, model_folder="unet", ema=ema)

    noise_scheduler = DDPMScheduler(num_train_timesteps=args.ddpm_num_steps, beta_schedule=args.ddpm_beta_schedule,
                                    prediction_type=args.prediction_type)
    immiscible = build_immiscible(args.immiscible, args.immiscible_k, args.assignment_cost_dtype,
                                  args.assignment_scope, accelerator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)

    # Steps per epoch are known only once the data is split across processes.
    num_update_steps = updates_per_epoch(math.ceil(len(loader) / accelerator.num_processes),
                                         args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * num_update_steps
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    num_update_steps = updates_per_epoch(len(loader), args.gradient_accumulation_steps)
    num_epochs = math.ceil(max_train_steps / num_update_steps)

    run_config = {key: value for key, value in vars(args).items() if key != "hub_token"}
    if accelerator.is_main_process:
        accelerator.init_trackers("train_immiscible_ddim", config=tracker_config(
            {**run_config, "num_processes": accelerator.num_processes}))
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"{len(dataset)} images, {accelerator.num_processes} process(es), batch {args.train_batch_size} per "
                f"process, total batch {total_batch_size}, {max_train_steps} optimisation steps ({num_epochs} epochs); "
                f"noise assignment: {immiscible!r}, scope {args.assignment_scope}")

    if args.seed is not None:
        set_seed(args.seed, device_specific=True)  # from here on, different noise and timesteps on each process
    global_step, first_epoch, resume_batches = 0, 0, 0
    checkpoint = find_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if checkpoint is not None:
        logger.info(f"Resuming from checkpoint {checkpoint}")
        accelerator.load_state(str(checkpoint))  # weights, EMA, optimizer, scheduler and every process's RNG
        global_step = checkpoint_step(checkpoint)
        first_epoch, resume_batches = resume_position(global_step, num_update_steps, args.gradient_accumulation_steps)
    elif args.resume_from_checkpoint is not None:
        logger.info(f"No checkpoint in {args.output_dir} yet: starting a new run")

    # --- training ----------------------------------------------------------------------------------------
    progress_bar = tqdm(range(max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
    train_loss = 0.0
    for epoch in range(first_epoch, num_epochs):
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
                loss = diffusion_loss(noise_scheduler, model_pred, clean_images, noise, timesteps)  # target: `noise`
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            train_loss += accelerator.reduce(loss.detach(), "mean").item() / args.gradient_accumulation_steps

            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(model.parameters())
            global_step += 1
            progress_bar.update(1)
            logs = {"loss": train_loss, "lr": lr_scheduler.get_last_lr()[0], **immiscible.last_stats.as_dict()}
            if ema is not None:
                logs["ema_decay"] = ema.cur_decay_value
            accelerator.log(logs, step=global_step)
            progress_bar.set_postfix(loss=train_loss, lr=logs["lr"])
            train_loss = 0.0
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
            if (global_step % args.validation_steps == 0 and global_step < max_train_steps
                    and accelerator.is_main_process):
                pipeline = DDIMPipeline(unet=accelerator.unwrap_model(model),
                                        scheduler=DDIMScheduler.from_config(noise_scheduler.config))
                with averaged_weights(model.parameters(), ema):
                    save_samples(accelerator, args, pipeline, global_step,
                                 Path(args.output_dir) / "samples" / f"step-{global_step:06d}.png")
            if global_step >= max_train_steps:
                break
        if global_step >= max_train_steps:
            break
    progress_bar.close()

    # --- save ----------------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(model)
        if ema is not None:
            ema.copy_to(unet.parameters())  # the saved pipeline holds the averaged weights
        pipeline = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(noise_scheduler.config))
        pipeline.save_pretrained(args.output_dir)
        save_samples(accelerator, args, pipeline, global_step, Path(args.output_dir) / "samples.png")
        summary = {**run_config, "num_processes": accelerator.num_processes, "total_batch_size": total_batch_size,
                   "global_step": global_step, "dataset": dataset_description, "num_images": len(dataset)}
        (Path(args.output_dir) / "training_config.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.info(f"Saved the DDIMPipeline and a sample grid to {args.output_dir}")
        if args.push_to_hub:
            push_to_hub(args, repo_id, summary)
    accelerator.end_training()


def save_samples(accelerator, args, pipeline, step, path):
    """Samples a grid with a fixed seed (comparable across steps), saves it and logs it."""
    images = sample_images(pipeline, seed=args.seed or 0, batch_size=args.num_validation_images,
                           num_inference_steps=args.ddim_num_inference_steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(path)
    log_images(accelerator, "samples", images, step)


def push_to_hub(args, repo_id, summary):
    settings = {"assignment": args.immiscible, "k (knn)": args.immiscible_k if args.immiscible == "knn" else "-",
                "assignment scope": args.assignment_scope, "assignment cost dtype": args.assignment_cost_dtype,
                "dataset": summary["dataset"], "resolution": args.resolution,
                "batch size (total)": summary["total_batch_size"], "processes": summary["num_processes"],
                "steps": summary["global_step"], "learning rate": args.learning_rate, "EMA": bool(args.use_ema),
                "prediction type": args.prediction_type, "mixed precision": args.mixed_precision or "accelerate default"}
    description = card_description(
        title=f"Immiscible DDIM: {repo_id}",
        summary=(f"An unconditional DDIM model trained with Immiscible Diffusion ({args.immiscible} noise "
                 "assignment, arXiv 2406.12303) using `train_immiscible_ddim.py` from immiscible-diffusers."),
        settings=settings, image="samples.png",
        usage=(f'from diffusers import DiffusionPipeline\n\npipeline = DiffusionPipeline.from_pretrained("{repo_id}")\n'
               f"images = pipeline(batch_size=16, num_inference_steps={args.ddim_num_inference_steps}).images"))
    tags = immiscible_tags(args.immiscible) + ["unconditional-image-generation", "ddim", f"scope-{args.assignment_scope}"]
    write_model_card(args.output_dir, repo_id, description, tags, hub_token=args.hub_token)
    upload_output_folder(args.output_dir, repo_id, args.hub_token)


if __name__ == "__main__":
    main(parse_args())
