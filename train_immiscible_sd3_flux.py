#!/usr/bin/env python
"""SD3 / SD3.5 and Flux training with Immiscible Diffusion (rectified flow): a LoRA of the transformer (the
default, as diffusers' DreamBooth LoRA scripts) or, with --rank 0, the whole transformer; saved as
pytorch_lora_weights.safetensors for the base pipeline's load_lora_weights (or as the whole pipeline).

    accelerate launch train_immiscible_sd3_flux.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium \\
        --instance_data_dir my_dog/ --instance_prompt "a photo of sks dog" --resolution 512 \\
        --train_batch_size 2 --max_train_steps 500 --mixed_precision bf16
    accelerate launch train_immiscible_sd3_flux.py --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev \\
        --instance_data_dir my_dog/ --instance_prompt "a photo of sks dog" --rank 16 --mixed_precision bf16

The family comes from the model's model_index.json. Like diffusers' examples/dreambooth/
train_dreambooth_lora_sd3.py and train_dreambooth_lora_flux.py (their command lines work: same flag names,
aliases, or an error saying what to use instead), plus the immiscible flags, captions or class names as
prompts, and a latent cache. The one change to their loop: the noise of each micro-batch is drawn and assigned
to its latents (`noise = immiscible(latents)`, KNN with k = 4 by default: it works at the batch sizes of 1-4
such fine-tunes use) before the flow interpolation and, for Flux, before the latents are packed into tokens;
the loss target is built from that assigned noise.
"""

import argparse
import json
import os
from pathlib import Path

import torch
from accelerate.logging import get_logger
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

from immiscible_pipeline.noise.global_batch import build_immiscible
from immiscible_pipeline.renoise import coupling_of_run
from immiscible_pipeline.training.accelerator_setup import (end_training, make_lr_scheduler, seed_noise_streams,
                                                            setup_accelerator, tracker_config, weight_dtype)
from immiscible_pipeline.training.arguments import (LR_SCHEDULERS, add_immiscible_arguments, add_optimizer_arguments,
                                                    add_output_arguments, assignment_batch_warning, check_common_args)
from immiscible_pipeline.training.checkpoints import epoch_plan, register_checkpoint_hooks, resume
from immiscible_pipeline.training.diffusers_example_flags import (DREAMBOOTH_FLOW_FLAGS, add_diffusers_flags,
                                                                  steps_from_epoch_flags)
from immiscible_pipeline.training.flow_matching import (flow_family, flow_matching_loss, interpolate,
                                                        sample_timesteps, WEIGHTING_SCHEMES)
from immiscible_pipeline.training.hub_publishing import (CHECKPOINT_PATTERNS, card_description, immiscible_tags,
                                                         lora_usage, upload_output_folder, write_model_card)
from immiscible_pipeline.data import train_dataloader
from immiscible_pipeline.training.latent_cache import batch_latents
from immiscible_pipeline.training.prompt_embeddings import known_prompts, PromptEmbeddings, PromptTexts
from immiscible_pipeline.training.prompted_data import (add_prompted_data_arguments, latent_training_samples,
                                                        load_prompted_dataset, make_optimizer)
from immiscible_pipeline.training.sample_grids import image_grid, log_images, sample_images
from immiscible_pipeline.training.step_bookkeeping import TrainingProgress
from immiscible_pipeline.training.transformer_lora import (add_text_encoder_lora, add_transformer_lora,
                                                           average_gradients, lora_target_modules, register_lora_hooks,
                                                           save_lora)

logger = get_logger(__name__, log_level="INFO")
DEFAULT_CACHE_FOLDER = "latent_cache"  # inside --output_dir, for a bare --cache_latents


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model and flow matching")
    model.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                       help="An SD3 / SD3.5 or Flux pipeline (Hub id or local folder); its model_index.json says "
                            "which.")
    model.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the Hub.")
    model.add_argument("--variant", type=str, default=None, help="Weights variant of the pretrained model, e.g. fp16.")
    model.add_argument("--rank", type=int, default=4,
                       help="LoRA rank on the transformer (diffusers' default, 4), saved as "
                            "pytorch_lora_weights.safetensors; 0: fine-tune the whole transformer and save the "
                            "pipeline.")
    model.add_argument("--lora_alpha", type=float, default=None,
                       help="LoRA alpha (scale alpha / rank). Default: as diffusers' script of the family (Flux: 4, "
                            "SD3: the rank).")
    model.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA layers.")
    model.add_argument("--lora_layers", type=str, default=None,
                       help='Comma-separated transformer modules to adapt, e.g. "attn.to_k,attn.to_q,attn.to_v,'
                            'attn.to_out.0". Default: the attention (and for Flux feed-forward) projections, as '
                            "diffusers' scripts.")
    model.add_argument("--train_text_encoder", action="store_true",
                       help="Also train a LoRA (the same rank and alpha) on the CLIP text encoder(s) (SD3: both, "
                            "Flux: its one; T5 stays frozen), as diffusers' scripts; their embeddings are then "
                            "computed every step.")
    model.add_argument("--text_encoder_lr", type=float, default=5e-6,
                       help="Learning rate of the text encoders' LoRA (not scaled by --scale_lr, as in diffusers).")
    model.add_argument("--adam_weight_decay_text_encoder", type=float, default=1e-3,
                       help="Weight decay of the text encoders' LoRA.")
    model.add_argument("--lora_blocks", type=str, default=None,
                       help='Comma-separated transformer block numbers to adapt (e.g. "0,12"; the double-stream '
                            "`transformer_blocks`). Default: all.")
    model.add_argument("--weighting_scheme", type=str, default=None, choices=WEIGHTING_SCHEMES,
                       help="Timestep density and loss weighting (diffusers' compute_density_for_timestep_sampling / "
                            "compute_loss_weighting_for_sd3). Default: as diffusers' script of the family (SD3: "
                            "logit_normal, Flux: none, i.e. uniform).")
    model.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit_normal density.")
    model.add_argument("--logit_std", type=float, default=1.0, help="Standard deviation of the logit_normal density.")
    model.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the mode density.")
    model.add_argument("--precondition_outputs", type=int, default=None, choices=[0, 1],
                       help="SD3 only (default 1, as diffusers): turn the prediction into an x0 estimate and target "
                            "the latents; 0: target the velocity noise - latents (always so for Flux).")
    model.add_argument("--guidance_scale", type=float, default=None,
                       help="Flux only: the value fed to a guidance-distilled transformer's guidance embedding while "
                            "training (diffusers: 3.5; ignored by models without one, e.g. FLUX.1-schnell).")
    model.add_argument("--max_sequence_length", type=int, default=None,
                       help="T5 tokens per prompt. Default: as diffusers' script of the family (SD3: 77, Flux: 512).")

    data = add_prompted_data_arguments(parser, resolution=512, default_cache_folder=DEFAULT_CACHE_FOLDER)
    data.add_argument("--repeats", type=int, default=1, help="Repeat the training images this many times per epoch.")

    imm = add_immiscible_arguments(parser, sample_name="latent")
    imm.add_argument("--immiscible_groups", type=str, default="none", choices=["none", "label"],
                     help="label: assign noise only among samples with the same prompt (or class). none: the whole "
                          "batch.")
    parser.set_defaults(immiscible="knn", immiscible_k=4)  # the follow-up's k for flow matching; fine at batch 1

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", type=str, default="immiscible-sd3-flux")
    train.add_argument("--seed", type=int, default=None, help="Seed for a reproducible run.")
    train.add_argument("--train_batch_size", type=int, default=4, help="Batch size per process.")
    train.add_argument("--num_train_epochs", type=int, default=1)
    train.add_argument("--max_train_steps", type=int, default=None,
                       help="Optimisation steps; overrides --num_train_epochs.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")
    train.add_argument("--learning_rate", type=float, default=1e-4, help="Peak learning rate.")
    train.add_argument("--scale_lr", action="store_true",
                       help="Multiply the learning rate by processes x batch size x accumulation steps.")
    train.add_argument("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS)
    train.add_argument("--lr_warmup_steps", type=int, default=500, help="Warm-up steps of the learning rate.")
    train.add_argument("--lr_num_cycles", type=int, default=1,
                       help="Restarts of cosine_with_restarts (only the default, 1, is supported).")
    train.add_argument("--lr_power", type=float, default=1.0,
                       help="Power of the polynomial schedule (only the default, 1.0, is supported).")
    train.add_argument("--optimizer", type=str, default="AdamW", help="AdamW (the only one supported).")
    train.add_argument("--use_8bit_adam", action="store_true", help="8-bit AdamW from bitsandbytes.")
    add_optimizer_arguments(train, adam_weight_decay=1e-4)  # the DreamBooth scripts' weight decay
    train.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="Default: the value of `accelerate config` / `accelerate launch`. The frozen VAE, text "
                            "encoders and (LoRA) base transformer run in this precision; trained weights are float32.")
    train.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere or newer GPUs.")

    save = add_output_arguments(parser, "checkpoints, validation, logs, hub")
    save.add_argument("--validation_prompts", type=str, nargs="+", default=None,
                      help="Prompts sampled every --validation_steps and at the end (saved and logged).")
    save.add_argument("--validation_steps", type=int, default=500, help="Sample the validation prompts every N steps.")
    save.add_argument("--num_validation_images", type=int, default=4, help="Images per validation prompt.")
    save.add_argument("--validation_inference_steps", type=int, default=28, help="Sampling steps for validation.")
    save.add_argument("--validation_guidance_scale", type=float, default=None,
                      help="Guidance scale of the validation images. Default: the pipeline's (SD3 7.0, Flux 3.5).")
    save.add_argument("--tracker_project_name", type=str, default="train_immiscible_sd3_flux")
    parser.set_defaults(enable_xformers_memory_efficient_attention=False)  # for check_common_args; not a flag here
    add_diffusers_flags(parser, DREAMBOOTH_FLOW_FLAGS)

    args = parser.parse_args(input_args)
    check_args(args)
    return args


def check_args(args):
    """Everything that can be checked before any data or model is loaded; fills the family's defaults."""
    family = flow_family(args.pretrained_model_name_or_path, args.revision)
    check_common_args(args, ("num_train_epochs", "validation_steps", "validation_inference_steps", "resolution",
                             "max_train_samples", "cache_latents_chunk_size", "repeats", "max_sequence_length"))
    if args.dataset_name is None and args.train_data_dir is None:
        raise ValueError("pass the training images: --instance_data_dir (or --train_data_dir) FOLDER, or "
                         "--dataset_name NAME")
    if args.rank < 0 or args.num_validation_images < 0:
        flag, value = ("rank", args.rank) if args.rank < 0 else ("num_validation_images", args.num_validation_images)
        raise ValueError(f"--{flag} must be at least 0, got {value}")
    if not args.rank and (args.lora_alpha, args.lora_layers, args.lora_blocks, args.lora_dropout) != (
            None, None, None, 0.0):
        raise ValueError("--lora_alpha, --lora_layers, --lora_blocks and --lora_dropout configure a LoRA, and --rank 0 "
                         "fine-tunes the whole transformer: pass --rank N, or drop them")
    if args.train_text_encoder and not args.rank:
        raise ValueError("--train_text_encoder trains a LoRA of the text encoders next to the transformer's "
                         "(--rank N); with --rank 0 (the whole transformer) it is not supported: drop one of them")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise ValueError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if family.name == "flux" and args.precondition_outputs is not None:
        raise ValueError("--precondition_outputs is a flag of diffusers' SD3 script; Flux's target is always the "
                         "velocity noise - latents: drop it")
    if family.name == "sd3" and args.guidance_scale is not None:
        raise ValueError("--guidance_scale is a flag of diffusers' Flux script (its guidance embedding); SD3 has "
                         "none: drop it (for the validation images' guidance use --validation_guidance_scale)")
    if args.optimizer.lower() != "adamw":
        raise ValueError(f"--optimizer {args.optimizer} is not supported: use AdamW (the default)")
    if (args.lr_num_cycles, args.lr_power) != (1, 1.0):
        flag = "--lr_num_cycles" if args.lr_num_cycles != 1 else "--lr_power"
        raise ValueError(f"{flag} is not supported (only its default); use --lr_scheduler cosine or linear instead")
    if args.use_8bit_adam:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("--use_8bit_adam needs bitsandbytes, which is not installed: pip install bitsandbytes")
    if not 0.0 <= args.caption_dropout <= 1.0:
        raise ValueError(f"--caption_dropout must be in [0, 1], got {args.caption_dropout}")
    if args.resolution % 16:
        raise ValueError(f"--resolution must be a multiple of 16 (the VAE's factor 8 times the 2x2 patches of the "
                         f"transformer), got {args.resolution}")
    args.family = family.name
    args.weighting_scheme = args.weighting_scheme or family.weighting_scheme
    args.max_sequence_length = args.max_sequence_length or family.max_sequence_length
    if family.name == "sd3":
        args.precondition_outputs = 1 if args.precondition_outputs is None else args.precondition_outputs
        args.lora_alpha = args.lora_alpha or args.rank or None
    else:
        args.guidance_scale = 3.5 if args.guidance_scale is None else args.guidance_scale
        args.lora_alpha = args.lora_alpha or (4.0 if args.rank else None)
    if args.cache_latents == "":
        args.cache_latents = os.path.join(args.output_dir, DEFAULT_CACHE_FOLDER)


def main(args):
    # --- setup -------------------------------------------------------------------------------------------
    accelerator, repo_id = setup_accelerator(args)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    family = flow_family(args.pretrained_model_name_or_path, args.revision)
    pipeline_class = family.pipeline_class

    # Frozen parts in the mixed precision: VAE, text encoders, and the transformer's base weights under a LoRA.
    pretrained = {"pretrained_model_name_or_path": args.pretrained_model_name_or_path, "revision": args.revision}
    frozen_dtype = weight_dtype(accelerator.mixed_precision)
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(subfolder="scheduler", **pretrained)
    precision = {} if frozen_dtype == torch.float32 else {"torch_dtype": frozen_dtype}  # diffusers 0.35's keyword
    text_pipeline = pipeline_class.from_pretrained(transformer=None, vae=None, variant=args.variant, **precision,
                                                   **pretrained)
    text_pipeline.to(accelerator.device)
    text_encoders = {}  # the CLIP encoders with a LoRA (--train_text_encoder), by pipeline component name
    text_encoder_parameters = []
    if args.train_text_encoder:
        text_encoders = {name: getattr(text_pipeline, name) for name in family.clip_text_encoders}
        for encoder in text_encoders.values():
            text_encoder_parameters += add_text_encoder_lora(encoder, args.rank, args.lora_alpha)
            encoder.train()
    # Frozen encoders run once per distinct prompt; trained ones every step, with gradients.
    prompt_embeddings = PromptEmbeddings(text_pipeline, args.max_sequence_length, trained=args.train_text_encoder)
    vae = AutoencoderKL.from_pretrained(subfolder="vae", variant=args.variant, **pretrained)
    vae.requires_grad_(False).eval().to(accelerator.device, frozen_dtype)
    transformer = load_transformer(pipeline_class, args)
    if args.rank:  # LoRA: the base stays frozen in the mixed precision; only the adapter trains, in float32
        transformer.to(accelerator.device, frozen_dtype)
        modules = lora_target_modules(family.lora_target_modules, args.lora_layers, args.lora_blocks)
        trainable = add_transformer_lora(transformer, args.rank, args.lora_alpha, args.lora_dropout, modules)
        register_lora_hooks(accelerator, pipeline_class, text_encoders)  # checkpoints hold the LoRA file
    else:
        trainable = list(transformer.parameters())
        register_checkpoint_hooks(accelerator, model_folder="transformer")
    transformer.train()
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()

    # Data: images (encoded by the VAE every step) or their cached latent distributions; prompts from
    # --instance_prompt, captions or class names. Shuffles, flips and prompt choices are fixed by (seed, epoch, row).
    instance_prompt = None if args.caption_column is not None else args.instance_prompt  # diffusers: captions win
    data = load_prompted_dataset(args, accelerator, instance_prompt)
    if args.cache_latents is not None and not args.center_crop:
        logger.warning("--cache_latents without --center_crop: the cache holds centre crops (one fixed crop per "
                       "image, as diffusers' scripts cache one crop)")
    samples = latent_training_samples(args, data, vae, accelerator,
                                      {**pretrained, "variant": args.variant, "vae_dtype": str(frozen_dtype)})
    train_samples = PromptTexts(samples, data.captioner, caption_key=data.caption_column)
    loader = train_dataloader(train_samples, args.train_batch_size, args.dataloader_num_workers)
    validate = bool(args.validation_prompts) and args.num_validation_images > 0
    prompts = None if args.train_text_encoder else known_prompts(data.captioner, data.dataset)
    if prompts is not None:  # diffusers frees the encoders of a one-prompt run too; ours go to the CPU
        prompts += (args.validation_prompts or []) + ([""] if validate and family.name == "sd3" else [])
        if len(set(prompts)) <= prompt_embeddings.cache_size:
            prompt_embeddings(prompts)  # every embedding the run will use, kept on the training device
            prompt_embeddings.offload()
            logger.info(f"The text encoders are on the CPU: the {len(set(prompts))} prompts of this run are encoded")

    immiscible = build_immiscible(args.immiscible, args.immiscible_k, args.assignment_cost_dtype,
                                  args.assignment_scope, accelerator)
    if warning := assignment_batch_warning(args.immiscible, args.train_batch_size, args.assignment_scope,
                                           accelerator.num_processes):
        logger.warning(warning)  # linear assignment of batches of one: vanilla training
    parameter_groups = [{"params": trainable}]
    if text_encoder_parameters:  # diffusers' second group: its own learning rate and weight decay
        parameter_groups.append({"params": text_encoder_parameters, "lr": args.text_encoder_lr,
                                 "weight_decay": args.adam_weight_decay_text_encoder})
    optimizer, learning_rate = make_optimizer(parameter_groups, args, accelerator)

    lr_scheduler, max_train_steps = make_lr_scheduler(args, optimizer, len(loader), accelerator, args.num_train_epochs)
    transformer, optimizer, loader, lr_scheduler = accelerator.prepare(transformer, optimizer, loader, lr_scheduler)
    num_update_steps, num_epochs = epoch_plan(len(loader), args.gradient_accumulation_steps, max_train_steps)
    steps_from_epoch_flags(args, num_update_steps)  # diffusers' --validation_epochs

    run_config = {key: value for key, value in vars(args).items() if key != "hub_token"}
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config(
            {**run_config, "num_processes": accelerator.num_processes}))
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"{family.pipeline_class_name}: {len(data.dataset)} images ({data.description}), "
                f"{accelerator.num_processes} process(es), batch {args.train_batch_size} per process, total batch "
                f"{total_batch_size}, {max_train_steps} optimisation steps ({num_epochs} epochs) at "
                f"{args.resolution} px; transformer {transformer_kind(args)}; weighting {args.weighting_scheme}; "
                f"prompts: {'class names' if data.captioner.is_class_label else 'text'} of column "
                f"{data.caption_column!r}; noise assignment: {immiscible!r}, scope {args.assignment_scope}, groups "
                f"{args.immiscible_groups}")

    if args.seed is not None:
        seed_noise_streams(args.seed, accelerator)  # from here on, different noise and timesteps on each process
    global_step, first_epoch, resume_batches = resume(accelerator, args, num_update_steps)  # or a new run
    inference_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(subfolder="scheduler", **pretrained)

    # --- training ----------------------------------------------------------------------------------------
    progress = TrainingProgress(accelerator, args, lr_scheduler, max_train_steps, global_step, immiscible)
    for epoch in range(first_epoch, num_epochs):
        if progress.stopping:
            break  # resumed from the final step's checkpoint: nothing left to train
        train_samples.start_epoch(epoch)  # this epoch's shuffle, flips and prompt choices
        transformer.train()
        batches = loader
        if epoch == first_epoch and resume_batches:
            batches = accelerator.skip_first_batches(loader, resume_batches)  # seen before the checkpoint
        for batch in batches:
            with accelerator.accumulate(transformer):
                latents = batch_latents(batch, vae, dtype=frozen_dtype)  # (VAE latents - shift) x scale, [B, C, H, W]
                text = prompt_embeddings(batch["prompt"])  # the frozen encoders run once per distinct prompt
                groups = batch["group"] if args.immiscible_groups == "label" else None
                noise = immiscible(latents, groups=groups)  # Immiscible Diffusion: fresh noise assigned to latents
                timesteps, sigmas = sample_timesteps(noise_scheduler, len(latents), args.weighting_scheme,
                                                     args.logit_mean, args.logit_std, args.mode_scale, latents.device)
                noisy_latents = interpolate(latents, noise, sigmas)  # (1 - sigma) x0 + sigma noise
                # Flux packs the noisy latents into 2x2 tokens inside (after the assignment) and unpacks the output.
                model_pred = family.predict(transformer, noisy_latents, timesteps, text, args.guidance_scale)
                # The target is built from the assigned `noise`: noise - latents (or latents, SD3 preconditioned).
                loss = flow_matching_loss(model_pred, latents, noise, noisy_latents, sigmas, args.weighting_scheme,
                                          bool(args.precondition_outputs))
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    average_gradients(text_encoder_parameters, accelerator)  # outside DDP: averaged here
                    if args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(trainable + text_encoder_parameters, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            # Step count, logs, progress bar; a checkpoint every --checkpointing_steps or on Ctrl-C / SIGTERM
            if progress.after_micro_batch(loss, trainable):
                step = progress.global_step
                if (validate and step % args.validation_steps == 0 and not progress.finished
                        and accelerator.is_main_process):
                    pipeline = pipeline_class(**{**text_pipeline.components, "vae": vae,
                                                 "scheduler": inference_scheduler,
                                                 "transformer": accelerator.unwrap_model(transformer)})
                    text = prompt_embeddings.pipeline_inputs(args.validation_prompts, negative=family.name == "sd3")
                    save_samples(accelerator, args, pipeline, step, Path(args.output_dir) / "samples" /
                                 f"step-{step:06d}.png", text)
            if progress.stopping:
                break
    progress.close()  # after Ctrl-C / SIGTERM: exits with status 130 (the checkpoint is saved, no pipeline)
    global_step = progress.global_step

    # --- save ----------------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        transformer = accelerator.unwrap_model(transformer)
        if args.rank:  # the LoRA file only; its samples come from the base pipeline with it loaded, as users will
            saved = save_lora(pipeline_class, {"transformer": transformer, **text_encoders}, args.output_dir)
            pipeline = None
            if validate:  # the training copies make room for the base pipeline the samples come from
                for model in (transformer, vae, text_pipeline):
                    model.to("cpu")
                accelerator.free_memory()
                pipeline = pipeline_class.from_pretrained(variant=args.variant, **precision, **pretrained)
                pipeline.load_lora_weights(args.output_dir)
        else:  # the stock pipeline with the trained transformer; the frozen parts in full precision, as loaded
            pipeline = pipeline_class.from_pretrained(transformer=transformer, variant=args.variant, **pretrained)
            pipeline.save_pretrained(args.output_dir)
            saved = f"the {family.pipeline_class_name} to {args.output_dir}"
        if validate:
            save_samples(accelerator, args, pipeline.to(accelerator.device), global_step,
                         Path(args.output_dir) / "samples.png")
        summary = {**run_config, "num_processes": accelerator.num_processes, "total_batch_size": total_batch_size,
                   "global_step": global_step, "dataset": data.description, "num_images": len(data.dataset),
                   "caption_column": data.caption_column, "class_names": data.captioner.class_names,
                   "scaled_learning_rate": learning_rate, "mixed_precision": accelerator.mixed_precision,
                   "prompts_encoded": prompt_embeddings.encoded,
                   "text_encoders_offloaded": prompt_embeddings.offloaded}
        (Path(args.output_dir) / "training_config.json").write_text(json.dumps(summary, indent=2) + "\n")
        # immiscible_coupling.json: how a re-noising sampler (Euler ancestral, DDPM) should draw its noise
        coupling_of_run(args.immiscible, args.immiscible_k, args.train_batch_size, args.assignment_scope,
                        accelerator.num_processes,
                        data.captioner.class_names if args.immiscible_groups == "label" else None).save(args.output_dir)
        logger.info(f"Saved {saved}")
        if args.push_to_hub:
            push_to_hub(args, repo_id, summary)
    end_training(accelerator)


def load_transformer(pipeline_class, args):
    """The pretrained transformer of the pipeline (SD3Transformer2DModel or FluxTransformer2DModel), float32."""
    import diffusers
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(args.pretrained_model_name_or_path, revision=args.revision)
    _, class_name = config["transformer"]
    return getattr(diffusers, class_name).from_pretrained(args.pretrained_model_name_or_path, subfolder="transformer",
                                                          revision=args.revision, variant=args.variant)


def save_samples(accelerator, args, pipeline, step, path, text=None):
    """--num_validation_images per validation prompt with a fixed seed (comparable across steps); saved and logged
    at `step`. `text`: the prompts' embeddings as pipeline arguments (else the pipeline encodes the prompts)."""
    extra = {} if args.validation_guidance_scale is None else {"guidance_scale": args.validation_guidance_scale}
    text = {"prompt": args.validation_prompts} if text is None else text
    with accelerator.autocast():
        images = sample_images(pipeline, seed=args.seed or 0, height=args.resolution, width=args.resolution,
                               num_inference_steps=args.validation_inference_steps,
                               num_images_per_prompt=args.num_validation_images,
                               max_sequence_length=args.max_sequence_length, **text, **extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(path)
    log_images(accelerator, "validation", images, step)


def transformer_kind(args) -> str:
    """How the transformer is trained, for the log and the model card."""
    if not args.rank:
        return "fine-tuned (whole)"
    return f"LoRA rank {args.rank}, alpha {args.lora_alpha:g}" + (" (and CLIP text encoders)" if
                                                                  args.train_text_encoder else "")


def push_to_hub(args, repo_id, summary):
    """The model card (a LoRA card by default: base model, trigger prompt, `lora` tag) and the upload."""
    example = (args.validation_prompts or [args.instance_prompt or "a photo"])[0]
    settings = {"assignment": args.immiscible, "k (knn)": args.immiscible_k if args.immiscible == "knn" else "-",
                "assignment scope": args.assignment_scope, "assignment groups": args.immiscible_groups,
                "base model": args.pretrained_model_name_or_path, "transformer": transformer_kind(args),
                "dataset": summary["dataset"], "prompts": (f"instance prompt {args.instance_prompt!r}"
                                                           if summary["caption_column"] == "instance_prompt" else
                                                           f"column {summary['caption_column']!r}"),
                "resolution": args.resolution, "batch size (total)": summary["total_batch_size"],
                "processes": summary["num_processes"], "steps": summary["global_step"],
                "learning rate": summary["scaled_learning_rate"], "weighting scheme": args.weighting_scheme,
                "mixed precision": summary["mixed_precision"]}
    method = (f"Immiscible Diffusion ({args.immiscible} noise assignment on the VAE latents, arXiv 2406.12303 / "
              f"2505.18521) on {summary['dataset']} using `train_immiscible_sd3_flux.py` from immiscible-diffusers")
    tags = immiscible_tags(args.immiscible) + ["text-to-image", args.family, f"{args.family}-diffusers"]
    image = "samples.png" if args.validation_prompts and args.num_validation_images else None
    if args.rank:
        trigger = f"\n\nTrigger prompt: `{args.instance_prompt}`." if args.instance_prompt else ""
        description = card_description(
            title=f"Immiscible LoRA: {repo_id}",
            summary=(f"LoRA weights (rank {args.rank}) for {args.pretrained_model_name_or_path}, trained with "
                     f"{method}. Load them on the base model with `load_lora_weights`.{trigger}"),
            settings=settings, image=image, usage=lora_usage(args.pretrained_model_name_or_path, repo_id, example))
        tags.append("lora")
    else:
        description = card_description(
            title=f"Immiscible {args.family.upper()}: {repo_id}",
            summary=f"A {args.family.upper()} transformer fine-tuned with {method}.", settings=settings, image=image,
            usage=(f'from diffusers import DiffusionPipeline\n\n'
                   f'pipeline = DiffusionPipeline.from_pretrained("{repo_id}")\n'
                   f"image = pipeline({example!r}).images[0]"))
    write_model_card(args.output_dir, repo_id, description, tags, hub_token=args.hub_token,
                     base_model=args.pretrained_model_name_or_path)
    cache = [f"{os.path.relpath(args.cache_latents, args.output_dir)}/*"] if args.cache_latents else []
    upload_output_folder(args.output_dir, repo_id, args.hub_token, ignore_patterns=(*CHECKPOINT_PATTERNS, *cache))


if __name__ == "__main__":
    main(parse_args())
