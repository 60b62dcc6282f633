"""The pixel trainers' skeleton: everything train_immiscible_ddim.py, train_immiscible_cm.py and
train_immiscible_flow.py do before and after their loop, so that the three differ only in their flags, their
objective (`pixel_objectives`) and their model card, while each keeps its loop in view:

    run = PixelRun(args, "train_immiscible_flow", RECIPES, grid_steps=args.validation_inference_steps)  # 1. set-up
    objective = FlowObjective(...)
    for batch in run.batches():                                  # 2. epochs, resume position, Ctrl-C
        with run.accelerator.accumulate(run.model):
            noise = run.immiscible(clean_images)                 #    Immiscible Diffusion
            loss = objective.loss(run.model, clean_images, noise, run.progress.global_step, run.max_train_steps)
            ...backward, clip, optimiser step...
        run.progress.add_loss(loss)
        if run.accelerator.sync_gradients:
            ...ema.step, progress.end_step(), progress.checkpoint_if_due(), run.samples_and_evaluations(objective)
    run.progress.close()
    run.save(objective, model_card)                              # 3. pipeline, coupling record, grid, config, Hub

Set-up order matters for exact repeats: the seed for the initial weights, the data, the UNet, then each
process's noise stream, then the resume.
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate.logging import get_logger

from ..noise.global_batch import build_immiscible
from ..renoise import coupling_of_run, matched_renoise
from .accelerator_setup import (end_training, make_adamw, make_ema, make_lr_scheduler, seed_noise_streams,
                                setup_accelerator, tracker_config)
from .arguments import assignment_batch_warning
from .checkpoints import epoch_plan, register_checkpoint_hooks, resume
from .diffusers_example_flags import steps_from_epoch_flags
from .hub_publishing import upload_output_folder, write_model_card
from .pixel_trainers import pixel_evaluator, pixel_training_data, record_evaluation
from .sample_grids import averaged_weights, image_grid, log_images, sample_images
from .step_bookkeeping import TrainingProgress
from .unet_presets import load_unet_config

logger = get_logger(__name__, log_level="INFO")
RECORDED_TYPES = (str, int, float, bool, list, tuple, type(None))  # the flags training_config.json records


class PixelRun:
    """One pixel training run: the Accelerator and seeds, the images, the UNet and its EMA, the noise assignment,
    the optimiser and its schedule, the resume position, the evaluator, and the progress bookkeeping.

    Args:
        args: the parsed flags (with a recipe applied, `pixel_arguments.apply_recipe`).
        tracker_name: the trackers' project name (the script's name).
        recipes: the script's recipes; the UNet of `args.recipe` is the default model.
        grid_steps: sampler step counts of the sample grids (one block of --num_validation_images each).
        unet_overrides: config entries set on whatever UNet is trained (e.g. the CM trainer's dropout).
    """

    def __init__(self, args, tracker_name: str, recipes: dict, grid_steps=(50,), unet_overrides: dict | None = None):
        self.args, self.grid_steps = args, tuple(grid_steps)
        self.accelerator, self.repo_id = setup_accelerator(args)  # the same weight seed on every process
        accelerator = self.accelerator
        if accelerator.is_main_process:
            logger.info(f"Recipe {args.recipe}: {recipes[args.recipe].description}; for flags left unset: "
                        f"{recipes[args.recipe].summary()}")

        unet_config = load_unet_config(args.model_config_name_or_path, recipes[args.recipe].defaults["unet"],
                                       args.resolution)
        unet_config.update(unet_overrides or {})
        args.resolution = unet_config["sample_size"]
        self.label_column = args.label_column if getattr(args, "class_conditional", False) else None
        (self.dataset, self.train_images, loader, self.dataset_description,
         self.class_names) = pixel_training_data(args, accelerator, unet_config["in_channels"], self.label_column)
        if self.class_names is not None:
            unet_config["num_class_embeds"] = len(self.class_names)  # a class embedding, used with class_labels=

        from diffusers import UNet2DModel

        model = UNet2DModel.from_config(unet_config)
        if args.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        if args.enable_xformers_memory_efficient_attention:
            model.enable_xformers_memory_efficient_attention()
        self.ema = make_ema(model, args, accelerator.device)
        register_checkpoint_hooks(accelerator, model_folder="unet", ema=self.ema)

        self.immiscible = build_immiscible(args.immiscible, args.immiscible_k, args.assignment_cost_dtype,
                                           args.assignment_scope, accelerator)
        # What sampling must keep (saved as immiscible_coupling.json); class-conditional: per class
        self.coupling = coupling_of_run(args.immiscible, args.immiscible_k, args.train_batch_size,
                                        args.assignment_scope, accelerator.num_processes, self.class_names)
        if warning := assignment_batch_warning(args.immiscible, args.train_batch_size, args.assignment_scope,
                                               accelerator.num_processes):
            logger.warning(warning)  # linear assignment of batches of one: vanilla training

        optimizer = make_adamw(model.parameters(), args, accelerator.device)
        lr_scheduler, self.max_train_steps = make_lr_scheduler(args, optimizer, len(loader), accelerator,
                                                               args.num_epochs)
        self.model, self.optimizer, self.loader, self.lr_scheduler = accelerator.prepare(model, optimizer, loader,
                                                                                         lr_scheduler)
        self.parameters = list(self.model.parameters())  # listed once: walking the modules costs 1% of a step
        num_update_steps, self.num_epochs = epoch_plan(len(self.loader), args.gradient_accumulation_steps,
                                                       self.max_train_steps)
        steps_from_epoch_flags(args, num_update_steps)  # diffusers' --save_images_epochs and the like

        self.run_config = {key: value for key, value in vars(args).items()
                           if key != "hub_token" and isinstance(value, RECORDED_TYPES)}
        if accelerator.is_main_process:
            accelerator.init_trackers(tracker_name, config=tracker_config(
                {**self.run_config, "num_processes": accelerator.num_processes}))
        self.total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        logger.info(f"{len(self.dataset)} images, {accelerator.num_processes} process(es), batch "
                    f"{args.train_batch_size} per process, total batch {self.total_batch_size}, "
                    f"{self.max_train_steps} optimisation steps ({self.num_epochs} epochs); noise assignment: "
                    f"{self.immiscible!r}, scope {args.assignment_scope}"
                    f"{', within each class' if self.class_names is not None else ''}")

        seed_noise_streams(args.seed, accelerator)  # from here on, noise and timesteps differ on each process
        # With --resume_from_checkpoint: weights, EMA, optimizer, scheduler and every process's RNG come back.
        global_step, self.first_epoch, self.resume_batches = resume(accelerator, args, num_update_steps)
        # With --eval_steps: the feature network (and classifier, if not cached) is ready before the first step.
        self.evaluator = pixel_evaluator(args, unet_config["in_channels"], accelerator, args.eval_inference_steps[0])
        self.progress = TrainingProgress(accelerator, args, self.lr_scheduler, self.max_train_steps, global_step,
                                         self.immiscible, self.ema)

    # --- the loop -------------------------------------------------------------------------------------------

    def batches(self):
        """The training batches, epoch after epoch (each epoch's own shuffle and augmentations), without those a
        resumed run saw before its checkpoint; ends after the last step or once Ctrl-C / SIGTERM stopped the run."""
        for epoch in range(self.first_epoch, self.num_epochs):
            if self.progress.stopping:
                return  # resumed from the final step's checkpoint: nothing left to train
            self.train_images.start_epoch(epoch)
            self.model.train()
            loader = self.loader
            if epoch == self.first_epoch and self.resume_batches:
                loader = self.accelerator.skip_first_batches(self.loader, self.resume_batches)
            for batch in loader:
                yield batch
                if self.progress.stopping:
                    return

    def class_labels(self, batch):
        """The batch's class indices with --class_conditional, else None."""
        return batch[self.label_column] if self.label_column is not None else None

    def clip_gradients(self) -> None:
        """Clips the gradient norm to --max_grad_norm (if positive) once the accumulated gradients are complete."""
        if self.accelerator.sync_gradients and self.args.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.parameters, self.args.max_grad_norm)

    def samples_and_evaluations(self, objective) -> None:
        """After a completed optimisation step: a sample grid every --validation_steps (the last step's is the
        saved pipeline's), and FID / KID at each --eval_inference_steps every --eval_steps and at the end."""
        args, progress, step = self.args, self.progress, self.progress.global_step
        if progress.interrupted:
            return
        unet = self.accelerator.unwrap_model(self.model)
        if step % args.validation_steps == 0 and not progress.finished and self.accelerator.is_main_process:
            with averaged_weights(self.parameters, self.ema):
                self.save_samples(self.sampling_pipeline(objective, unet), step,
                                  Path(args.output_dir) / "samples" / f"step-{step:06d}.png")
        if self.evaluator is not None and (step % args.eval_steps == 0 or progress.finished):
            pipeline = self.sampling_pipeline(objective, unet)
            for num_steps in args.eval_inference_steps:
                record_evaluation(self.accelerator, args, self.evaluator, pipeline, self.model, self.ema, step,
                                  num_steps)

    def sampling_pipeline(self, objective, unet):
        """The objective's stock pipeline; with --renoise matched (the CM trainer), re-noising between steps
        paired with the estimates as training paired noise with images."""
        pipeline = objective.pipeline(unet)
        return matched_renoise(pipeline, self.coupling) if getattr(self.args, "renoise", None) == "matched" \
            else pipeline

    def save_samples(self, pipeline, step: int, path: Path) -> None:
        """One block of --num_validation_images per grid step count, the same seeded noise in each (comparable
        across steps and step counts); saved as one grid and logged per step count. Class-conditional: the
        classes in turn."""
        count = self.args.num_validation_images
        call = {}
        if self.class_names is not None:
            import torch

            call["class_labels"] = torch.arange(count, device=self.accelerator.device) % len(self.class_names)
        images = []
        for num_steps in self.grid_steps:
            block = sample_images(pipeline, seed=self.args.seed or 0, batch_size=count, num_inference_steps=num_steps,
                                  **call)
            log_images(self.accelerator, "samples" if len(self.grid_steps) == 1 else f"samples_{num_steps}_step",
                       block, step)
            images.extend(block)
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images, cols=int(count**0.5) if int(count**0.5) ** 2 == count else count).save(path)

    # --- the end --------------------------------------------------------------------------------------------

    def save(self, objective, model_card, extra_summary: dict | None = None) -> None:
        """The objective's pipeline with the (EMA) weights, immiscible_coupling.json, samples.png and
        training_config.json in --output_dir; with --push_to_hub, the card of `model_card(args, repo_id,
        summary, coupling) -> (description, tags)` and the upload. Ends the run on every process."""
        accelerator, args = self.accelerator, self.args
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            unet = accelerator.unwrap_model(self.model)
            if self.ema is not None:
                self.ema.copy_to(unet.parameters())  # the saved pipeline holds the averaged weights
            pipeline = objective.pipeline(unet)
            pipeline.save_pretrained(args.output_dir)
            self.coupling.save(args.output_dir)  # how a re-noising sampler should pair its noise
            self.save_samples(self.sampling_pipeline(objective, unet), self.progress.global_step,
                              Path(args.output_dir) / "samples.png")
            summary = {**self.run_config, "num_processes": accelerator.num_processes,
                       "total_batch_size": self.total_batch_size, "mixed_precision": accelerator.mixed_precision,
                       "global_step": self.progress.global_step, "dataset": self.dataset_description,
                       "num_images": len(self.dataset), "class_names": self.class_names, **(extra_summary or {})}
            (Path(args.output_dir) / "training_config.json").write_text(json.dumps(summary, indent=2) + "\n")
            logger.info(f"Saved the {type(pipeline).__name__} and a sample grid to {args.output_dir}")
            if args.push_to_hub:
                description, tags = model_card(args, self.repo_id, summary, self.coupling)
                write_model_card(args.output_dir, self.repo_id, description, tags, hub_token=args.hub_token)
                upload_output_folder(args.output_dir, self.repo_id, args.hub_token)
        end_training(accelerator)


def card_settings(args, summary: dict, coupling) -> dict:
    """The settings table every pixel trainer's model card starts with."""
    return {"assignment": args.immiscible, "k (knn)": args.immiscible_k if args.immiscible == "knn" else "-",
            "assignment scope": coupling.scope, "assignment cost dtype": args.assignment_cost_dtype,
            "recipe": args.recipe, "dataset": summary["dataset"], "resolution": args.resolution,
            "batch size (total)": summary["total_batch_size"], "processes": summary["num_processes"],
            "steps": summary["global_step"], "learning rate": args.learning_rate, "EMA": bool(args.use_ema),
            "mixed precision": summary["mixed_precision"]}
