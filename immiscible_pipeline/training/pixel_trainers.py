"""What the pixel-space trainers (DDIM, consistency models, flow) share besides `pixel_run`: their training
images (a dataset, a folder or the bundled MNIST demo), their FID evaluator for --eval_steps and the record of
each evaluation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .checkpoints import EVAL_HISTORY
from .pixel_arguments import DEMO_RECIPE

logger = logging.getLogger(__name__)


def pixel_training_data(args, accelerator, channels: int, label_column: str | None = None):
    """The images of --dataset_name / --train_data_dir, or the bundled MNIST demo (said in the log), as seeded
    `TrainImages` and their loader; the main process downloads and caches first. With `label_column` (a
    ClassLabel column, checked) batches also hold the labels. Returns (dataset, train_images, loader,
    description of the source, class names or None)."""
    from ..data import (ImageTransform, class_label_names, describe_dataset, load_image_dataset,
                             train_dataloader, train_images_for)

    description = describe_dataset(args.dataset_name, args.train_data_dir)
    if args.bundled_demo and accelerator.is_main_process:
        demo = (f" with a small UNet for {args.max_train_steps} steps, a demo that needs no download and finishes "
                "in minutes on a CPU" if args.recipe == DEMO_RECIPE else f" with the {args.recipe} recipe")
        logger.info(f"No --dataset_name or --train_data_dir: training on {description}, 50,000 digits at "
                    f"{args.resolution} px{demo}. Pass --dataset_name or --train_data_dir to train on your own images.")
    elif accelerator.is_main_process:
        logger.info(f"Training on {description} at {args.resolution} px.")
    with accelerator.main_process_first():  # one process downloads and caches, the others then read the cache
        dataset = load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir)
    class_names = class_label_names(dataset, label_column) if label_column is not None else None
    transform = ImageTransform(args.resolution, channels, args.center_crop, args.random_flip)
    data_seed = args.seed if args.seed is not None else 0  # the same shuffle on every process
    train_images = train_images_for(dataset, args.image_column, transform, seed=data_seed,
                                    keep_columns=[label_column] if label_column is not None else ())
    loader = train_dataloader(train_images, args.train_batch_size, args.dataloader_num_workers)
    return dataset, train_images, loader, description, class_names


def pixel_evaluator(args, channels: int, accelerator, num_inference_steps: int):
    """The `TrainingEvaluator` of --eval_steps (None without it), against the training data (MNIST for the
    demo), prepared now: the feature network (the classifier is trained if not cached) before the first step."""
    if args.eval_steps is None:
        return None
    from ..evaluation.pipeline_metrics import TrainingEvaluator
    from ..evaluation.reference_images import ReferenceSpec

    named_labels = args.label_column if getattr(args, "class_conditional", False) else None  # else: found by name
    reference = ReferenceSpec() if args.bundled_demo else ReferenceSpec(
        args.dataset_name or args.train_data_dir, config_name=args.dataset_config_name, image_column=args.image_column,
        label_column=named_labels, cache_dir=args.cache_dir)
    evaluator = TrainingEvaluator(reference, args.eval_num_samples, args.eval_feature, num_inference_steps,
                                  batch_size=args.train_batch_size, seed=args.seed or 0,
                                  num_reference=args.eval_num_reference, progress=True)
    evaluator.prepare(args.resolution, channels, accelerator)
    return evaluator


def record_evaluation(accelerator, args, evaluator, pipeline, model, ema, step: int,
                      num_inference_steps: int | None = None) -> dict:
    """FID / KID (and, on classifier features, the confident share) of the current (EMA) weights in `pipeline`,
    sampled with `num_inference_steps` (the evaluator's own if None); every process samples its share. Logged
    under eval/ (eval/<n>_step/ for a given count) and appended by the main process to eval_history.jsonl,
    the FID-versus-steps curve of the run."""
    from .sample_grids import averaged_weights

    with averaged_weights(model.parameters(), ema):
        metrics = evaluator(pipeline, accelerator, num_inference_steps=num_inference_steps)
    prefix = "eval/" if num_inference_steps is None else f"eval/{num_inference_steps}_step/"
    accelerator.log({prefix + name: value for name, value in metrics.items()}, step=step)
    if accelerator.is_main_process:
        from ..renoise import is_matched

        sampler = {} if num_inference_steps is None else {"num_inference_steps": num_inference_steps}
        sampler["renoise"] = "matched" if is_matched(pipeline) else "independent"
        record = {"step": step, **sampler, **metrics, "num_samples": args.eval_num_samples,
                  "feature": args.eval_feature, "classifier_test_accuracy": evaluator.classifier_test_accuracy}
        with open(Path(args.output_dir) / EVAL_HISTORY, "a") as history:
            history.write(json.dumps(record) + "\n")
        sampling = "" if num_inference_steps is None else f", {num_inference_steps}-step sampling"
        logger.info(f"step {step}{sampling}: FID {metrics['fid']:.3f}, KID {metrics['kid_mean']:.5f} "
                    f"({args.eval_feature} features)")
    return metrics
