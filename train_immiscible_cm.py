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
import json
from pathlib import Path

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import ConsistencyModelPipeline, UNet2DModel

from immiscible_pipeline.noise.global_batch import build_immiscible
from immiscible_pipeline.renoise import coupling_of_run, matched_renoise, warn_if_independent
from immiscible_pipeline.training.accelerator_setup import (end_training, make_adamw, make_ema, make_lr_scheduler,
                                                            setup_accelerator, tracker_config)
from immiscible_pipeline.training.arguments import (LR_SCHEDULERS, add_ema_warmup_arguments, add_evaluation_arguments,
                                                    add_immiscible_arguments, add_optimizer_arguments,
                                                    add_output_arguments, add_pixel_data_arguments,
                                                    assignment_batch_warning, check_common_args,
                                                    fill_pixel_defaults)
from immiscible_pipeline.training.checkpoints import epoch_plan, register_checkpoint_hooks, resume
from immiscible_pipeline.training.consistency_training import (LOSSES, SAMPLER_LEVELS, consistency_loss,
                                                              ConsistencyRecipe)
from immiscible_pipeline.training.hub_publishing import (card_description, immiscible_tags, upload_output_folder,
                                                         write_model_card)
from immiscible_pipeline.training.pixel_trainers import pixel_evaluator, pixel_training_data, record_evaluation
from immiscible_pipeline.training.sample_grids import averaged_weights, image_grid, log_images, sample_images
from immiscible_pipeline.training.step_bookkeeping import TrainingProgress
from immiscible_pipeline.training.unet_presets import CIFAR10_UNET, MNIST_UNET, load_unet_config

logger = get_logger(__name__, log_level="INFO")

# Flags left unset take these values: with no dataset flag, a demo on the bundled MNIST at 16 px sized for a
# CPU; with a dataset, the DDPM CIFAR-10 UNet with iCT's CIFAR-10 dropout (0.3) and learning rate (1e-4).
# The demo's small UNet trains without dropout: in a few thousand steps it underfits rather than overfits.
# 1000 steps took 7.6 min on an idle 2-core CPU (FID 4.0 / 5.8 at 1 / 2 sampler steps, classifier features);
# 1500 steps reached 2.9 / 4.6 but took about 11 min, over the 10-minute budget of the demo.
DEMO_DEFAULTS = {"unet": MNIST_UNET, "train_batch_size": 64, "max_train_steps": 1000, "learning_rate": 1e-3,
                 "lr_warmup_steps": 100, "dropout": 0.0}
DATASET_DEFAULTS = {"unet": CIFAR10_UNET, "train_batch_size": 128, "max_train_steps": None, "learning_rate": 1e-4,
                    "lr_warmup_steps": 500, "dropout": 0.3}
GRID_STEPS = (1, 2)  # samples.png: one-step and two-step samples of the same noise


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = add_pixel_data_arguments(parser)
    data.add_argument("--class_conditional", action="store_true",
                      help="Condition on a ClassLabel column (--label_column): a class embedding in the UNet, "
                           "noise assigned within each class, `class_labels=` at sampling.")
    data.add_argument("--label_column", type=str, default="label",
                      help="The ClassLabel column for --class_conditional.")

    model = parser.add_argument_group("model and consistency training (defaults: improved consistency training)")
    model.add_argument("--model_config_name_or_path", type=str, default=None,
                       help="A UNet2DModel config (folder, json file or Hub id). Default: a small 16 px grey UNet "
                            "for the MNIST demo, the DDPM CIFAR-10 UNet (32 px RGB) for a dataset.")
    model.add_argument("--dropout", type=float, default=None,
                       help="UNet dropout. Default: 0.3 with a dataset (iCT on CIFAR-10), 0 for the MNIST demo.")
    defaults = ConsistencyRecipe()
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

    add_immiscible_arguments(parser).set_defaults(immiscible_k=4)  # the follow-up paper's k for CM

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", type=str, default="immiscible-cm")
    train.add_argument("--seed", type=int, default=None, help="Seed for a reproducible run (without it, one is drawn "
                       "and recorded in training_config.json). Process p draws its noise from seed + p.")
    train.add_argument("--train_batch_size", type=int, default=None,
                       help=f"Batch size per process. Default: {DEMO_DEFAULTS['train_batch_size']} for the MNIST demo, "
                            f"{DATASET_DEFAULTS['train_batch_size']} for a dataset.")
    train.add_argument("--num_epochs", type=int, default=None,
                       help="Epochs to train, unless --max_train_steps is given. Default: 100 (the MNIST demo: "
                            f"{DEMO_DEFAULTS['max_train_steps']} steps unless one of the two is given).")
    train.add_argument("--max_train_steps", type=int, default=None,
                       help="Optimisation steps (the curriculum spans them); overrides --num_epochs. "
                            f"Default: {DEMO_DEFAULTS['max_train_steps']} for the MNIST demo.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")
    train.add_argument("--learning_rate", type=float, default=None,
                       help=f"Peak learning rate. Default: {DEMO_DEFAULTS['learning_rate']:g} for the MNIST demo, "
                            f"{DATASET_DEFAULTS['learning_rate']:g} (iCT) for a dataset.")
    train.add_argument("--lr_scheduler", type=str, default="constant_with_warmup", choices=LR_SCHEDULERS)
    train.add_argument("--lr_warmup_steps", type=int, default=None,
                       help=f"Warm-up steps. Default: {DEMO_DEFAULTS['lr_warmup_steps']} for the MNIST demo, "
                            f"{DATASET_DEFAULTS['lr_warmup_steps']} for a dataset.")
    add_optimizer_arguments(train, adam_weight_decay=0.0)  # iCT: Adam without weight decay
    train.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="Default: the value of `accelerate config` / `accelerate launch`.")
    train.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True,
                       help="Keep an EMA of the weights (with warm-up) for sampling and saving (iCT samples the EMA).")
    add_ema_warmup_arguments(train)
    train.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")

    save = add_output_arguments(parser)
    save.add_argument("--validation_steps", type=int, default=500,
                      help="Save and log one- and two-step sample grids every N steps (and at the end).")
    save.add_argument("--num_validation_images", type=int, default=16, help="Images per sample grid.")

    evaluation = add_evaluation_arguments(parser)
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
    fill_pixel_defaults(args, DEMO_DEFAULTS, DATASET_DEFAULTS)  # sets args.bundled_demo
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    args.recipe = ConsistencyRecipe(args.sigma_min, args.sigma_max, args.sigma_data, args.rho, args.curriculum_start,
                                    args.curriculum_end, args.p_mean, args.p_std, args.loss, args.huber_c)
    args.eval_feature = args.eval_feature or ("classifier" if args.bundled_demo else "inception")


def main(args):
    # --- setup -------------------------------------------------------------------------------------------
    accelerator, repo_id = setup_accelerator(args)  # also: the same seed everywhere, output dir, Hub repo

    defaults = DEMO_DEFAULTS if args.bundled_demo else DATASET_DEFAULTS
    unet_config = load_unet_config(args.model_config_name_or_path, defaults["unet"], args.resolution)
    unet_config["dropout"] = args.dropout
    args.resolution = unet_config["sample_size"]
    dataset, train_images, loader, dataset_description, class_names = pixel_training_data(
        args, accelerator, unet_config["in_channels"], args.label_column if args.class_conditional else None)
    if class_names is not None:
        unet_config["num_class_embeds"] = len(class_names)  # a class embedding, used with class_labels=

    model = UNet2DModel.from_config(unet_config)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        model.enable_xformers_memory_efficient_attention()
    ema = make_ema(model, args, accelerator.device)
    register_checkpoint_hooks(accelerator, model_folder="unet", ema=ema)

    recipe = args.recipe
    scheduler = recipe.scheduler()  # training uses its scalings, so the saved pipeline samples what was trained
    immiscible = build_immiscible(args.immiscible, args.immiscible_k, args.assignment_cost_dtype,
                                  args.assignment_scope, accelerator)
    # What sampling must keep: saved beside the pipeline, used by the grids and evaluations (--renoise)
    coupling = coupling_of_run(args.immiscible, args.immiscible_k, args.train_batch_size, args.assignment_scope,
                               accelerator.num_processes, class_names)  # class-conditional: per class
    if accelerator.is_main_process:
        warn_if_independent(coupling, scheduler, args.renoise, num_inference_steps=max(GRID_STEPS))
    if warning := assignment_batch_warning(args.immiscible, args.train_batch_size, args.assignment_scope,
                                           accelerator.num_processes):
        logger.warning(warning)  # linear assignment of batches of one: vanilla training
    optimizer = make_adamw(model.parameters(), args, accelerator.device)

    lr_scheduler, max_train_steps = make_lr_scheduler(args, optimizer, len(loader), accelerator, args.num_epochs)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    parameters = list(model.parameters())  # listed once: walking the modules costs 1% of a small UNet's step
    num_update_steps, num_epochs = epoch_plan(len(loader), args.gradient_accumulation_steps, max_train_steps)

    run_config = {key: value for key, value in vars(args).items() if key not in ("hub_token", "recipe")}
    if accelerator.is_main_process:
        accelerator.init_trackers("train_immiscible_cm", config=tracker_config(
            {**run_config, "num_processes": accelerator.num_processes}))
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"{len(dataset)} images, {accelerator.num_processes} process(es), batch {args.train_batch_size} per "
                f"process, total batch {total_batch_size}, {max_train_steps} optimisation steps ({num_epochs} epochs); "
                f"noise levels {recipe.num_levels(0, max_train_steps)} -> "
                f"{recipe.num_levels(max_train_steps - 1, max_train_steps)}; noise assignment: {immiscible!r}, "
                f"scope {args.assignment_scope}{', within each class' if args.class_conditional else ''}")

    set_seed(args.seed, device_specific=True)  # from here on, different noise and levels on each process
    # With --resume_from_checkpoint: weights, EMA, optimizer, scheduler and every process's RNG come back.
    global_step, first_epoch, resume_batches = resume(accelerator, args, num_update_steps)

    # With --eval_steps: the feature network (and the classifier, if not cached) is ready before the first step.
    evaluator = pixel_evaluator(args, unet_config["in_channels"], accelerator, args.eval_inference_steps[0])

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
            class_labels = batch[args.label_column] if args.class_conditional else None
            with accelerator.accumulate(model):
                # Immiscible Diffusion: fresh noise assigned to these images (within each class if conditional)
                noise = immiscible(clean_images, groups=class_labels)
                # Adjacent levels (sigma_n, sigma_{n+1}) of the curriculum's current discretisation, per image
                sigma_low, sigma_high = recipe.sample_sigmas(clean_images.shape[0], progress.global_step,
                                                             max_train_steps, clean_images.device)
                # f(x + sigma_{n+1} z) against stop-gradient f(x + sigma_n z), with the same z
                loss = consistency_loss(model, clean_images, noise, sigma_low, sigma_high, scheduler, recipe,
                                        class_labels, target_model=accelerator.unwrap_model(model))
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
                    pipeline = sampling_pipeline(accelerator.unwrap_model(model), recipe, args, coupling)
                    with averaged_weights(parameters, ema):
                        save_samples(accelerator, args, pipeline, class_names, step,
                                     Path(args.output_dir) / "samples" / f"step-{step:06d}.png")
                if evaluator is not None and (step % args.eval_steps == 0 or progress.finished):
                    evaluate(accelerator, args, evaluator, model, ema, recipe, coupling, step)
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
        pipeline = ConsistencyModelPipeline(unet=unet, scheduler=recipe.scheduler())
        pipeline.save_pretrained(args.output_dir)  # the stock scheduler
        coupling.save(args.output_dir)  # immiscible_coupling.json: how multistep sampling should re-noise
        pipeline = sampling_pipeline(unet, recipe, args, coupling)
        save_samples(accelerator, args, pipeline, class_names, global_step, Path(args.output_dir) / "samples.png")
        summary = {**run_config, "num_processes": accelerator.num_processes, "total_batch_size": total_batch_size,
                   "mixed_precision": accelerator.mixed_precision, "global_step": global_step,
                   "dataset": dataset_description, "num_images": len(dataset), "class_names": class_names,
                   "final_num_levels": recipe.num_levels(max(global_step - 1, 0), max_train_steps)}
        (Path(args.output_dir) / "training_config.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.info(f"Saved the ConsistencyModelPipeline and one- and two-step samples to {args.output_dir}")
        if args.push_to_hub:
            push_to_hub(args, repo_id, summary, coupling)
    end_training(accelerator)


def sampling_pipeline(unet, recipe, args, coupling):
    """The stock pipeline with a scheduler of its own, re-noising between steps as --renoise says."""
    pipeline = ConsistencyModelPipeline(unet=unet, scheduler=recipe.scheduler())
    return matched_renoise(pipeline, coupling) if args.renoise == "matched" else pipeline


def evaluate(accelerator, args, evaluator, model, ema, recipe, coupling, step):
    """FID / KID of the current (EMA) weights at each of --eval_inference_steps, logged as eval/<n>_step/* and
    appended to eval_history.jsonl (one line per sampler step count, with the re-noising used)."""
    pipeline = sampling_pipeline(accelerator.unwrap_model(model), recipe, args, coupling)
    for num_steps in args.eval_inference_steps:
        record_evaluation(accelerator, args, evaluator, pipeline, model, ema, step, num_steps)


def save_samples(accelerator, args, pipeline, class_names, step, path):
    """One-step samples above two-step samples of the same noises (a fixed seed, comparable across steps);
    saved as one grid and logged per step count. Class-conditional: the classes in turn."""
    count = args.num_validation_images
    labels = None
    if class_names is not None:
        labels = torch.arange(count, device=accelerator.device) % len(class_names)
    grids = []
    for num_steps in GRID_STEPS:
        images = sample_images(pipeline, seed=args.seed or 0, batch_size=count, num_inference_steps=num_steps,
                               class_labels=labels)
        log_images(accelerator, f"samples_{num_steps}_step", images, step)
        grids.extend(images)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(grids, cols=int(count**0.5) if int(count**0.5) ** 2 == count else count).save(path)


def push_to_hub(args, repo_id, summary, coupling):
    settings = {"assignment": args.immiscible, "k (knn)": args.immiscible_k if args.immiscible == "knn" else "-",
                "assignment scope": coupling.scope, "assignment cost dtype": args.assignment_cost_dtype,
                "dataset": summary["dataset"], "resolution": args.resolution,
                "class-conditional": bool(args.class_conditional),
                "batch size (total)": summary["total_batch_size"], "processes": summary["num_processes"],
                "steps": summary["global_step"], "learning rate": args.learning_rate, "EMA": bool(args.use_ema),
                "loss": args.loss, "noise levels": f"{args.curriculum_start} -> {args.curriculum_end}",
                "sigma range": f"[{args.sigma_min}, {args.sigma_max}]", "dropout": args.dropout,
                "mixed precision": summary["mixed_precision"],
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
               f"# through sigma 0.82 instead of the grid's 2.24: measured better for every method on MNIST\n"
               f"two_step = pipeline(batch_size=16, num_inference_steps=None, timesteps="
               f"{args.recipe.two_step_timesteps()}{labels}).images"))
    task = "class-conditional-image-generation" if args.class_conditional else "unconditional-image-generation"
    tags = immiscible_tags(args.immiscible) + [task, "consistency-models", f"scope-{coupling.scope}"]
    write_model_card(args.output_dir, repo_id, description, tags, hub_token=args.hub_token)
    upload_output_folder(args.output_dir, repo_id, args.hub_token)


if __name__ == "__main__":
    main(parse_args())
