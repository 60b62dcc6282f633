#!/usr/bin/env python
"""Latent Stable Diffusion training with Immiscible Diffusion: class-conditional (or captioned), from scratch,
fine-tuned, or a LoRA; saved as a StableDiffusionPipeline (or, with --rank, as LoRA weights for the base model).
An SDXL model (its model_index.json says StableDiffusionXLPipeline) trains the same way, with its two text
encoders, pooled embedding and size ids, and is saved as a StableDiffusionXLPipeline (or SDXL LoRA weights).

    accelerate launch train_immiscible_sd.py --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \\
        --dataset_name ILSVRC/imagenet-1k --caption_column label --prompt_template "a photo of a {}" \\
        --resolution 256 --center_crop --random_flip --from_scratch --immiscible linear
    accelerate launch train_immiscible_sd.py \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 --rank 4 \\
        --train_data_dir my_dog/ --instance_prompt "a photo of sks dog" --train_batch_size 2 \\
        --immiscible knn --immiscible_k 4

Like diffusers' examples/text_to_image/train_text_to_image.py and train_text_to_image_lora.py, and their _sdxl
versions (their command lines work: same flag names, aliases, or an error saying what to use instead; add
--rank 4 to a LoRA command that relied on the LoRA script's default rank), plus the immiscible flags, prompts made
from class names, and a latent cache. The one change to the usual loop: the noise of each micro-batch is drawn and
assigned to its scaled VAE latents (`noise = immiscible(latents)`) before noise offset, input perturbation and
`add_noise`, and that assigned noise is what the loss targets.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from accelerate.logging import get_logger
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from immiscible_pipeline.noise.global_batch import build_immiscible
from immiscible_pipeline.renoise import coupling_of_run
from immiscible_pipeline.training.accelerator_setup import (end_training, make_adamw, make_ema, make_lr_scheduler,
                                                            seed_noise_streams, setup_accelerator, tracker_config,
                                                            weight_dtype)
from immiscible_pipeline.training.arguments import (LR_SCHEDULERS, add_ema_warmup_arguments, add_immiscible_arguments,
                                                    add_optimizer_arguments, add_output_arguments,
                                                    assignment_batch_warning, check_common_args, min_snr_gamma)
from immiscible_pipeline.training.captions import Captioner, prompt_column, PromptedSamples
from immiscible_pipeline.training.checkpoints import epoch_plan, register_checkpoint_hooks, resume
from immiscible_pipeline.training.diffusers_example_flags import (SDXL_TEXT_TO_IMAGE_FLAGS, TEXT_TO_IMAGE_FLAGS,
                                                                  add_diffusers_flags, steps_from_epoch_flags)
from immiscible_pipeline.training.hub_publishing import (card_description, immiscible_tags, lora_usage,
                                                         upload_output_folder, write_model_card)
from immiscible_pipeline.data import describe_dataset, load_image_dataset, train_dataloader, TrainImages
from immiscible_pipeline.training.latent_cache import CACHE_DTYPES, batch_latents, build_latent_cache, CachedLatents
from immiscible_pipeline.training.lora import (add_unet_lora, base_pipeline_with_lora, register_lora_checkpoint_hooks,
                                               save_unet_lora)
from immiscible_pipeline.training.prompt_embeddings import PromptEmbeddings, PromptTexts
from immiscible_pipeline.training.sdxl import is_sdxl, sdxl_time_ids
from immiscible_pipeline.training.losses import PREDICTION_TYPES, min_snr_loss
from immiscible_pipeline.training.sample_grids import averaged_weights, image_grid, log_images, sample_images
from immiscible_pipeline.training.stable_diffusion import (INTERPOLATIONS, check_pretrained_model,
                                                           FilteredImageTransform, load_inference_scheduler,
                                                           stable_diffusion_pipeline)
from immiscible_pipeline.training.step_bookkeeping import TrainingProgress

logger = get_logger(__name__, log_level="INFO")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model and diffusion")
    model.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                       help="A Stable Diffusion model (Hub id or local folder) giving the VAE, text encoder, "
                            "tokenizer, noise scheduler and the UNet (its weights, or only its config with "
                            "--from_scratch).")
    model.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the Hub.")
    model.add_argument("--variant", type=str, default=None, help="Weights variant of the pretrained model, e.g. fp16.")
    model.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                       help="A VAE to use instead of the model's, saved with the pipeline (diffusers' SDXL scripts: "
                            "e.g. madebyollin/sdxl-vae-fp16-fix, which does not overflow in fp16).")
    model.add_argument("--timestep_bias_strategy", type=str, default="none",
                       help="diffusers' SDXL timestep bias; only none (timesteps drawn uniformly) is supported.")
    model.add_argument("--from_scratch", action="store_true",
                       help="Initialise the UNet randomly from the pretrained UNet's config instead of fine-tuning it.")
    model.add_argument("--rank", type=int, default=0,
                       help="Train a LoRA of this rank (alpha = rank) on the UNet's attention projections instead of "
                            "the whole UNet, saved as pytorch_lora_weights.safetensors for the base model's "
                            "load_lora_weights. 0 (default; diffusers' LoRA script: 4): fine-tune the whole UNet.")
    model.add_argument("--prediction_type", type=str, default=None, choices=PREDICTION_TYPES,
                       help="What the UNet predicts. Default: the pretrained scheduler's prediction_type. The saved "
                            "pipeline's scheduler is set to it.")
    model.add_argument("--snr_gamma", type=float, default=None,
                       help="Min-SNR loss weighting with this gamma (arXiv 2303.09556; 5.0 is usual). Default (or 0): "
                            "off.")
    model.add_argument("--noise_offset", type=float, default=0.0,
                       help="Scale of the offset noise added per sample and channel, after the assignment.")
    model.add_argument("--input_perturbation", type=float, default=0.0,
                       help="Scale of the extra noise added to the UNet input only (arXiv 2301.11706; 0.1 is usual); "
                            "the loss still targets the assigned noise.")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", type=str, default=None, help="A dataset on the Hub, e.g. ILSVRC/imagenet-1k.")
    data.add_argument("--dataset_config_name", type=str, default=None, help="The config of --dataset_name.")
    data.add_argument("--train_data_dir", type=str, default=None,
                      help="A folder of images; class sub-folders become a `label` column (datasets' imagefolder). "
                           "Neither this nor --dataset_name: the bundled offline MNIST.")
    data.add_argument("--image_column", type=str, default="image", help="The dataset column holding the images.")
    data.add_argument("--caption_column", type=str, default=None,
                      help="Column giving the prompts: a ClassLabel column (prompt from --prompt_template and the "
                           "dataset's class names) or a text column (a caption or a list of captions per row). "
                           "Default: `text` as in diffusers, or else the dataset's class labels (an image folder's "
                           "class sub-folders).")
    data.add_argument("--instance_prompt", type=str, default=None,
                      help='One prompt for every image (e.g. "a photo of sks dog"), for a folder of images of one '
                           "thing without captions.")
    data.add_argument("--prompt_template", type=str, default="a photo of a {}",
                      help="Prompt for a class-label column; {} is replaced by the class name.")
    data.add_argument("--class_name_synonyms", type=str, default="first", choices=["first", "random", "all"],
                      help='Class names with comma-separated synonyms ("tench, Tinca tinca"): use the first, a random '
                           "one per sample, or the whole name.")
    data.add_argument("--caption_dropout", type=float, default=0.0,
                      help="Fraction of prompts replaced by the empty prompt, for classifier-free guidance.")
    data.add_argument("--max_train_samples", type=int, default=None,
                      help="Train on a random subset of this many rows (fixed by --seed).")
    data.add_argument("--cache_dir", type=str, default=None, help="Where datasets are downloaded and cached.")
    data.add_argument("--resolution", type=int, default=None,
                      help="Training resolution. Default: the pretrained UNet's sample_size times the VAE's factor.")
    data.add_argument("--center_crop", action="store_true", help="Centre crop (default: a random crop).")
    data.add_argument("--random_flip", action="store_true", help="Random horizontal flips.")
    data.add_argument("--image_interpolation_mode", type=str, default="lanczos", choices=list(INTERPOLATIONS),
                      help="Filter for resizing images to the resolution.")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading processes.")
    data.add_argument("--cache_latents", type=str, default=None, metavar="DIR",
                      help="Encode the dataset with the VAE once into DIR (latent mean and std per image, and per "
                           "mirrored image with --random_flip; resumable, shared across processes) and train from "
                           "it. Needs --center_crop. Reused by later runs with the same model and preprocessing.")
    data.add_argument("--cache_latents_chunk_size", type=int, default=1024,
                      help="Images per cache file: the unit of resuming an interrupted encoding and of sharing it "
                           "across processes.")
    data.add_argument("--cache_latents_dtype", type=str, default="float32", choices=sorted(CACHE_DTYPES),
                      help="Storage precision of the cached latent mean and std (float16 halves the size).")

    imm = add_immiscible_arguments(parser, sample_name="latent")
    imm.add_argument("--immiscible_groups", type=str, default="none", choices=["none", "label"],
                     help="label: assign noise only among samples with the same conditioning (the same class, or "
                          "the same caption for text; dropped prompts form their own group), so the noise prior "
                          "is not skewed per class (C2OT, arXiv 2503.10636). Needs several samples per class in "
                          "a batch to do anything. none: the whole batch, as in the paper.")

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", type=str, default="immiscible-sd")
    train.add_argument("--seed", type=int, default=None, help="Seed for a reproducible run (without it, one is drawn "
                       "and recorded in training_config.json). Process p draws its noise from seed + p.")
    train.add_argument("--train_batch_size", type=int, default=16, help="Batch size per process.")
    train.add_argument("--num_train_epochs", type=int, default=100)
    train.add_argument("--max_train_steps", type=int, default=None,
                       help="Optimisation steps; overrides --num_train_epochs.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")
    train.add_argument("--learning_rate", type=float, default=1e-4, help="Peak learning rate.")
    train.add_argument("--scale_lr", action="store_true",
                       help="Multiply the learning rate by processes x batch size x accumulation steps.")
    train.add_argument("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS)
    train.add_argument("--lr_warmup_steps", type=int, default=500, help="Warm-up steps of the learning rate.")
    train.add_argument("--use_8bit_adam", action="store_true", help="8-bit AdamW from bitsandbytes.")
    add_optimizer_arguments(train)
    train.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="Default: the value of `accelerate config` / `accelerate launch`. The frozen VAE and text "
                            "encoder run in this precision; the UNet trains in float32 under autocast.")
    train.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere or newer GPUs.")
    train.add_argument("--use_ema", action="store_true", help="Keep an EMA of the UNet (with warm-up) and save it.")
    add_ema_warmup_arguments(train)
    train.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")

    save = add_output_arguments(parser, "checkpoints, validation, logs, hub")
    save.add_argument("--validation_prompts", type=str, nargs="+", default=None,
                      help="Prompts sampled every --validation_steps and at the end (saved and logged).")
    save.add_argument("--validation_steps", type=int, default=500, help="Sample the validation prompts every N steps.")
    save.add_argument("--num_validation_images", type=int, default=1,
                      help="Images per validation prompt (0: no validation images).")
    save.add_argument("--validation_inference_steps", type=int, default=25, help="Sampling steps for validation.")
    save.add_argument("--validation_guidance_scale", type=float, default=7.5, help="Classifier-free guidance scale.")
    save.add_argument("--tracker_project_name", type=str, default="train_immiscible_sd")
    add_diffusers_flags(parser, TEXT_TO_IMAGE_FLAGS)
    add_diffusers_flags(parser, SDXL_TEXT_TO_IMAGE_FLAGS)

    args = parser.parse_args(input_args)
    check_args(args)
    return args


def check_args(args):
    """Everything that can be checked before any data or model is loaded."""
    check_pretrained_model(args.pretrained_model_name_or_path, args.revision)
    check_common_args(args, ("num_train_epochs", "validation_steps", "validation_inference_steps", "resolution",
                             "max_train_samples", "cache_latents_chunk_size"))
    args.snr_gamma = min_snr_gamma(args.snr_gamma)
    if args.rank < 0 or args.num_validation_images < 0:
        flag, value = ("rank", args.rank) if args.rank < 0 else ("num_validation_images", args.num_validation_images)
        raise ValueError(f"--{flag} must be at least 0, got {value}")
    if args.rank and args.from_scratch:
        raise ValueError("--rank trains a LoRA on top of the pretrained UNet, and --from_scratch discards that UNet: "
                         "drop one of them")
    if args.timestep_bias_strategy != "none":
        raise ValueError(f"--timestep_bias_strategy {args.timestep_bias_strategy} is not supported: timesteps are "
                         "drawn uniformly (drop the flag, or pass none)")
    if args.rank and args.use_ema:
        raise ValueError("--use_ema is not supported with --rank (LoRA): the LoRA weights are saved as trained, as "
                         "diffusers' LoRA script does; drop --use_ema, or fine-tune the whole UNet (no --rank)")
    if not 0.0 <= args.caption_dropout <= 1.0:
        raise ValueError(f"--caption_dropout must be in [0, 1], got {args.caption_dropout}")
    if args.cache_latents is not None and not args.center_crop:
        raise ValueError("--cache_latents stores one encoding per image, which a random crop would change every "
                         "epoch: add --center_crop (random flips are fine: the mirrored image is cached too)")
    if args.use_8bit_adam:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("--use_8bit_adam needs bitsandbytes, which is not installed: pip install bitsandbytes")


def main(args):
    # --- setup -------------------------------------------------------------------------------------------
    accelerator, repo_id = setup_accelerator(args)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # Frozen parts in the mixed precision (the UNet trains in float32 under autocast).
    pretrained = {"pretrained_model_name_or_path": args.pretrained_model_name_or_path, "revision": args.revision}
    frozen_dtype = weight_dtype(accelerator.mixed_precision)
    noise_scheduler = DDPMScheduler.from_pretrained(subfolder="scheduler", **pretrained)
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    sdxl = is_sdxl(args.pretrained_model_name_or_path, args.revision)
    if sdxl:  # two text encoders and a pooled embedding, from the pipeline's encode_prompt, once per distinct prompt
        from diffusers import StableDiffusionXLPipeline

        precision = {} if frozen_dtype == torch.float32 else {"torch_dtype": frozen_dtype}
        text_pipeline = StableDiffusionXLPipeline.from_pretrained(unet=None, vae=None, variant=args.variant,
                                                                  **precision, **pretrained).to(accelerator.device)
        prompt_embeddings = PromptEmbeddings(text_pipeline, max_sequence_length=0)
    else:
        tokenizer = CLIPTokenizer.from_pretrained(subfolder="tokenizer", **pretrained)
        text_encoder = CLIPTextModel.from_pretrained(subfolder="text_encoder", variant=args.variant, **pretrained)
        text_encoder.requires_grad_(False).eval().to(accelerator.device, frozen_dtype)
    vae = load_vae(args)
    vae_dtype = frozen_dtype
    if sdxl and frozen_dtype == torch.float16 and args.pretrained_vae_model_name_or_path is None:
        vae_dtype = torch.float32  # SDXL's own VAE overflows in fp16 (diffusers' SDXL scripts keep it in float32)
    vae.requires_grad_(False).eval().to(accelerator.device, vae_dtype)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.from_scratch:
        unet_config = UNet2DConditionModel.load_config(subfolder="unet", **pretrained)
        unet = UNet2DConditionModel.from_config(unet_config)
        if args.resolution is not None:  # so that the saved pipeline samples at the trained size by default
            unet.register_to_config(sample_size=args.resolution // vae_scale)
    else:
        unet = UNet2DConditionModel.from_pretrained(subfolder="unet", variant=args.variant, **pretrained)
    resolution = args.resolution or unet.config.sample_size * vae_scale
    if args.rank:  # LoRA: the base stays frozen in the mixed precision; only the adapter trains, in float32
        unet.to(accelerator.device, frozen_dtype)
        trainable = add_unet_lora(unet, args.rank)
    else:
        trainable = list(unet.parameters())
    unet.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    ema = make_ema(unet, args, accelerator.device)
    if args.rank:  # checkpoints hold pytorch_lora_weights.safetensors, as diffusers' LoRA script writes them
        register_lora_checkpoint_hooks(accelerator)
    else:
        register_checkpoint_hooks(accelerator, model_folder="unet", ema=ema)

    # Data: images (encoded by the VAE every step) or their cached latent distributions; prompts from the
    # class names or captions. Shuffles, flips and prompt choices are fixed by (seed, epoch, row).
    dataset_description = describe_dataset(args.dataset_name, args.train_data_dir)
    with accelerator.main_process_first():
        dataset = load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir)
    dataset, caption_column = prompt_column(dataset, args.caption_column, args.instance_prompt)  # default: `text`
    captioner = Captioner.for_dataset(dataset, caption_column, args.prompt_template, args.class_name_synonyms,
                                      args.caption_dropout)
    labelled = captioner.labelled_rows(dataset)
    if labelled is not None:
        logger.info(f"Dropping {len(dataset) - len(labelled)} rows without a class (label -1)")
        dataset = dataset.select(labelled)
    data_seed = args.seed if args.seed is not None else 0  # the same shuffle on every process
    if args.max_train_samples is not None:
        dataset = dataset.shuffle(seed=data_seed).select(range(min(args.max_train_samples, len(dataset))))
    if args.cache_latents is None:
        transform = FilteredImageTransform(resolution, 3, args.center_crop, args.random_flip,
                                           args.image_interpolation_mode)
        samples = TrainImages(dataset, args.image_column, transform, data_seed, keep_columns=[caption_column])
    else:
        unflipped = FilteredImageTransform(resolution, 3, True, False, args.image_interpolation_mode)
        to_encode = TrainImages(dataset, args.image_column, unflipped, data_seed, keep_columns=[caption_column])
        settings = {**pretrained, "variant": args.variant, "vae_config": dict(vae.config),
                    "dataset": dataset_description, "dataset_config_name": args.dataset_config_name,
                    "dataset_fingerprint": getattr(dataset, "_fingerprint", None), "image_column": args.image_column,
                    "caption_column": caption_column, "resolution": resolution,
                    "interpolation": args.image_interpolation_mode, "vae_dtype": str(vae_dtype)}
        started = time.perf_counter()
        cache = build_latent_cache(args.cache_latents, to_encode, vae, settings, accelerator,
                                   batch_size=args.train_batch_size, chunk_size=args.cache_latents_chunk_size,
                                   flip=args.random_flip,
                                   dtype=args.cache_latents_dtype, num_workers=args.dataloader_num_workers,
                                   caption_key=caption_column)
        logger.info(f"Latent cache {args.cache_latents}: {len(cache)} images ready in "
                    f"{time.perf_counter() - started:.1f} s")
        samples = CachedLatents(cache, data_seed, args.random_flip, caption_key=caption_column)
    if sdxl:  # the prompt as text: SDXL's two tokenizers encode it
        train_samples = PromptTexts(samples, captioner, caption_key=caption_column)
    else:
        train_samples = PromptedSamples(samples, captioner, tokenizer, caption_key=caption_column)
    loader = train_dataloader(train_samples, args.train_batch_size, args.dataloader_num_workers)

    immiscible = build_immiscible(args.immiscible, args.immiscible_k, args.assignment_cost_dtype,
                                  args.assignment_scope, accelerator)
    if warning := assignment_batch_warning(args.immiscible, args.train_batch_size, args.assignment_scope,
                                           accelerator.num_processes):
        logger.warning(warning)  # linear assignment of batches of one: vanilla training
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    if args.use_8bit_adam:
        import bitsandbytes

        optimizer = bitsandbytes.optim.AdamW8bit(trainable, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                                 weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    else:
        optimizer = make_adamw(trainable, args, accelerator.device, learning_rate)

    lr_scheduler, max_train_steps = make_lr_scheduler(args, optimizer, len(loader), accelerator, args.num_train_epochs)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    num_update_steps, num_epochs = epoch_plan(len(loader), args.gradient_accumulation_steps, max_train_steps)
    steps_from_epoch_flags(args, num_update_steps)  # diffusers' --validation_epochs
    validate = bool(args.validation_prompts) and args.num_validation_images > 0

    run_config = {key: value for key, value in vars(args).items() if key != "hub_token"}
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config(
            {**run_config, "num_processes": accelerator.num_processes}))
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"{len(dataset)} images ({dataset_description}), {accelerator.num_processes} process(es), batch "
                f"{args.train_batch_size} per process, total batch {total_batch_size}, {max_train_steps} optimisation "
                f"steps ({num_epochs} epochs) at {resolution} px; UNet "
                f"{unet_kind(args)}{'' if args.rank or args.from_scratch else ' (for a LoRA pass --rank, e.g. 4)'}; "
                f"prompts: {'class names' if captioner.is_class_label else 'captions'} of column "
                f"{caption_column!r}; noise assignment: {immiscible!r}, scope {args.assignment_scope}, "
                f"groups {args.immiscible_groups}")

    seed_noise_streams(args.seed, accelerator)  # from here on, different noise and timesteps on each process
    global_step, first_epoch, resume_batches = resume(accelerator, args, num_update_steps)  # or a new run
    inference_scheduler = load_inference_scheduler(args.pretrained_model_name_or_path, args.revision,
                                                   noise_scheduler.config.prediction_type)

    # --- training ----------------------------------------------------------------------------------------
    progress = TrainingProgress(accelerator, args, lr_scheduler, max_train_steps, global_step, immiscible, ema)
    for epoch in range(first_epoch, num_epochs):
        if progress.stopping:
            break  # resumed from the final step's checkpoint: nothing left to train
        train_samples.start_epoch(epoch)  # this epoch's shuffle, flips and prompt choices
        unet.train()
        batches = loader
        if epoch == first_epoch and resume_batches:
            batches = accelerator.skip_first_batches(loader, resume_batches)  # seen before the checkpoint
        for batch in batches:
            with accelerator.accumulate(unet):
                latents = batch_latents(batch, vae, dtype=vae_dtype)  # VAE latents x scaling_factor
                added_cond_kwargs = None
                if sdxl:  # both encoders' states, the pooled embedding and the size ids
                    text = prompt_embeddings(batch["prompt"])
                    encoder_hidden_states = text["prompt_embeds"]
                    added_cond_kwargs = {"text_embeds": text["pooled_prompt_embeds"],
                                         "time_ids": sdxl_time_ids(len(latents), resolution, latents.device)}
                else:
                    encoder_hidden_states = text_encoder(batch["input_ids"])[0]
                groups = batch["group"] if args.immiscible_groups == "label" else None
                noise = immiscible(latents, groups=groups)  # Immiscible Diffusion: fresh noise assigned to latents
                if args.noise_offset:
                    noise = noise + args.noise_offset * torch.randn(*latents.shape[:2], 1, 1, device=latents.device,
                                                                    dtype=latents.dtype)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                          device=latents.device)
                input_noise = noise
                if args.input_perturbation:
                    input_noise = noise + args.input_perturbation * torch.randn_like(noise)
                noisy_latents = noise_scheduler.add_noise(latents, input_noise, timesteps)
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states,
                                  added_cond_kwargs=added_cond_kwargs).sample
                # The target is built from the assigned `noise` (epsilon, or the velocity for v-prediction).
                loss = min_snr_loss(noise_scheduler, model_pred, latents, noise, timesteps, args.snr_gamma)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            # EMA, step count, logs, progress bar; a checkpoint every --checkpointing_steps or on Ctrl-C / SIGTERM
            if progress.after_micro_batch(loss, trainable):
                step = progress.global_step
                if (validate and step % args.validation_steps == 0 and not progress.finished
                        and accelerator.is_main_process):
                    if sdxl:
                        pipeline = StableDiffusionXLPipeline(**{**text_pipeline.components, "vae": vae,
                                                                "unet": accelerator.unwrap_model(unet),
                                                                "scheduler": inference_scheduler})
                    else:
                        pipeline = stable_diffusion_pipeline(accelerator.unwrap_model(unet), vae, text_encoder,
                                                             tokenizer, inference_scheduler)
                    with averaged_weights(unet.parameters(), ema):
                        save_samples(accelerator, args, pipeline, resolution, step,
                                     Path(args.output_dir) / "samples" / f"step-{step:06d}.png")
            if progress.stopping:
                break
    progress.close()  # after Ctrl-C / SIGTERM: exits with status 130 (the checkpoint is saved, no pipeline)
    global_step = progress.global_step

    # --- save ----------------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(unet)
        if args.rank:  # the LoRA file only; its samples come from the base pipeline with it loaded, as users will
            saved = save_unet_lora(unet, args.output_dir)
            pipeline = None
            if validate and sdxl:
                pipeline = StableDiffusionXLPipeline.from_pretrained(variant=args.variant, **precision, **pretrained)
                pipeline.load_lora_weights(args.output_dir)
            elif validate:
                pipeline = base_pipeline_with_lora(args.pretrained_model_name_or_path, args.output_dir,
                                                   revision=args.revision, variant=args.variant, dtype=frozen_dtype)
            if validate:
                pipeline.scheduler = inference_scheduler  # the trained prediction type
        else:
            if ema is not None:
                ema.copy_to(unet.parameters())  # the saved pipeline holds the averaged weights
            if sdxl:  # the frozen parts as they were loaded (full precision)
                pipeline = StableDiffusionXLPipeline.from_pretrained(unet=unet, scheduler=inference_scheduler,
                                                                     vae=load_vae(args), variant=args.variant,
                                                                     **pretrained)
            else:
                if frozen_dtype != torch.float32:  # save the frozen parts in full precision, as they were loaded
                    text_encoder = CLIPTextModel.from_pretrained(subfolder="text_encoder", variant=args.variant,
                                                                 **pretrained)
                    vae = load_vae(args)
                pipeline = stable_diffusion_pipeline(unet, vae, text_encoder, tokenizer, inference_scheduler)
            pipeline.save_pretrained(args.output_dir)
            saved = f"the {type(pipeline).__name__} to {args.output_dir}"
        if validate:
            save_samples(accelerator, args, pipeline.to(accelerator.device), resolution, global_step,
                         Path(args.output_dir) / "samples.png")
        summary = {**run_config, "num_processes": accelerator.num_processes, "total_batch_size": total_batch_size,
                   "global_step": global_step, "resolution": resolution, "dataset": dataset_description,
                   "num_images": len(dataset), "caption_column": caption_column, "class_names": captioner.class_names,
                   "scaled_learning_rate": learning_rate, "mixed_precision": accelerator.mixed_precision}
        (Path(args.output_dir) / "training_config.json").write_text(json.dumps(summary, indent=2) + "\n")
        # immiscible_coupling.json: how a re-noising sampler (Euler ancestral, DDPM) should draw its noise
        coupling_of_run(args.immiscible, args.immiscible_k, args.train_batch_size, args.assignment_scope,
                        accelerator.num_processes,
                        captioner.class_names if args.immiscible_groups == "label" else None).save(args.output_dir)
        logger.info(f"Saved {saved}")
        if args.push_to_hub:
            push_to_hub(args, repo_id, summary)
    end_training(accelerator)


def load_vae(args):
    """The pretrained model's VAE, or --pretrained_vae_model_name_or_path (float32, as saved)."""
    if args.pretrained_vae_model_name_or_path is not None:
        return AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, revision=args.revision,
                                             variant=args.variant)
    return AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision,
                                         variant=args.variant)


def save_samples(accelerator, args, pipeline, resolution, step, path):
    """--num_validation_images per validation prompt with a fixed seed (comparable across steps); saved and logged
    at `step`."""
    with accelerator.autocast():
        images = sample_images(pipeline, seed=args.seed or 0, prompt=args.validation_prompts, height=resolution,
                               width=resolution, num_inference_steps=args.validation_inference_steps,
                               guidance_scale=args.validation_guidance_scale,
                               num_images_per_prompt=args.num_validation_images)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(path)
    log_images(accelerator, "validation", images, step)


def unet_kind(args) -> str:
    """How the UNet is trained, for the log and the model card."""
    return "from scratch" if args.from_scratch else f"LoRA rank {args.rank}" if args.rank else "fine-tuned"


def push_to_hub(args, repo_id, summary):
    """The model card (a LoRA card with --rank: base model, trigger or class prompts, `lora` tag) and the upload."""
    class_prompts = [args.prompt_template.format(name.split(",")[0].strip()) for name in summary["class_names"] or []]
    if args.instance_prompt is not None:
        prompts, example = f"instance prompt {args.instance_prompt!r}", args.instance_prompt
    elif class_prompts:
        prompts, example = f"{args.prompt_template!r} with the class names", class_prompts[0]
    else:
        prompts, example = f"captions of column {summary['caption_column']!r}", "a photo"
    example = args.validation_prompts[0] if args.validation_prompts else example
    settings = {"assignment": args.immiscible, "k (knn)": args.immiscible_k if args.immiscible == "knn" else "-",
                "assignment scope": args.assignment_scope, "assignment groups": args.immiscible_groups,
                "base model": args.pretrained_model_name_or_path,
                "UNet": unet_kind(args),
                "dataset": summary["dataset"], "prompts": prompts,
                "resolution": summary["resolution"], "batch size (total)": summary["total_batch_size"],
                "processes": summary["num_processes"], "steps": summary["global_step"],
                "learning rate": summary["scaled_learning_rate"], "EMA": args.use_ema, "snr_gamma": args.snr_gamma,
                "mixed precision": summary["mixed_precision"]}
    method = (f"Immiscible Diffusion ({args.immiscible} noise assignment on the VAE latents, arXiv 2406.12303) on "
              f"{summary['dataset']} using `train_immiscible_sd.py` from immiscible-diffusers")
    tags = immiscible_tags(args.immiscible) + ["stable-diffusion", "text-to-image", f"scope-{args.assignment_scope}"]
    image = "samples.png" if args.validation_prompts and args.num_validation_images else None
    if args.rank:
        if args.instance_prompt is not None:
            trigger = f"Trigger prompt: `{args.instance_prompt}`."
        elif class_prompts:
            trigger = "Class prompts: " + ", ".join(f"`{prompt}`" for prompt in class_prompts[:20]) + "."
        else:
            trigger = f"Prompts: the captions of column `{summary['caption_column']}`."
        description = card_description(
            title=f"Immiscible LoRA: {repo_id}",
            summary=(f"LoRA weights (rank {args.rank}) for {args.pretrained_model_name_or_path}, trained with "
                     f"{method}. Load them on the base model with `load_lora_weights`.\n\n{trigger}"),
            settings=settings, image=image, usage=lora_usage(args.pretrained_model_name_or_path, repo_id, example))
        tags.append("lora")
    else:
        description = card_description(
            title=f"Immiscible Stable Diffusion: {repo_id}",
            summary=f"A Stable Diffusion UNet trained with {method}.", settings=settings, image=image,
            usage=(f'from diffusers import DiffusionPipeline\n\n'
                   f'pipeline = DiffusionPipeline.from_pretrained("{repo_id}")\n'
                   f"image = pipeline({example!r}, num_inference_steps=50).images[0]"))
    write_model_card(args.output_dir, repo_id, description, tags, hub_token=args.hub_token,
                     base_model=args.pretrained_model_name_or_path)
    upload_output_folder(args.output_dir, repo_id, args.hub_token)


if __name__ == "__main__":
    main(parse_args())
