"""FID / KID of a saved pipeline (or a folder of images) against a reference dataset.

    python -m immiscible_pipeline.evaluate --model output/ --reference mnist --feature classifier
    accelerate launch -m immiscible_pipeline.evaluate --model output/ --reference cifar10 \
        --reference_image_column img --num_samples 10000 --feature inception
    python -m immiscible_pipeline.evaluate --model sd-out/ --reference imagenet-folder/ \
        --prompts_file class_prompts.txt --samples_per_class 50
    python -m immiscible_pipeline.evaluate --model cm-out/ --num_inference_steps 1 2   # one FID per step count
    python -m immiscible_pipeline.evaluate --model ddim-out/ --scheduler ddpm --num_inference_steps 50

A model trained with noise assignment (its folder holds immiscible_coupling.json) is sampled with matched
re-noising by default: a stochastic sampler's injected noise is paired with the clean estimates as training
paired noise with images (`--renoise independent` for stock diffusers).

Prints the metrics and writes them as JSON (`--output_json`, default `<model>/evaluation.json`).
With `--sample_only --save_images DIR` it only writes the images (the sampling command).
"""

from __future__ import annotations

import argparse
import json
import os


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model",
                        help="a saved diffusers pipeline folder (DDIMPipeline, StableDiffusionPipeline, ...)")
    source.add_argument("--images", help="a folder of generated images to score instead of sampling from a model")
    parser.add_argument("--reference", default="mnist",
                        help="'mnist' (bundled, offline), a local image folder, or a Hub dataset name")
    parser.add_argument("--reference_split", default="train")
    parser.add_argument("--reference_config_name", default=None)
    parser.add_argument("--reference_image_column", default=None, help="default: 'image' or 'img'")
    parser.add_argument("--reference_label_column", default=None,
                        help="labels for training the classifier (default: 'label')")
    parser.add_argument("--num_reference", type=int, default=10_000,
                        help="reference images (a seeded subset; 0 = the whole split); their features are cached")
    parser.add_argument("--feature", choices=("inception", "classifier"), default="inception",
                        help="inception: the FID InceptionV3 (comparable with published FIDs; ~4-8 img/s on CPU). "
                             "classifier: a small CNN trained on the reference's labels (MNIST practice), cached")
    parser.add_argument("--num_samples", type=int, default=2000, help="images to generate")
    parser.add_argument("--batch_size", type=int, default=64, help="images per pipeline call")
    parser.add_argument("--num_inference_steps", type=int, nargs="+", default=None,
                        help="sampler steps; several give one result each (default: 1 and 2 for a consistency "
                             "model, 50 otherwise; --sample_only takes one: 1 for a consistency model)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic DDIM)")
    parser.add_argument("--timesteps", type=int, nargs="+", default=None,
                        help="explicit sampler timesteps instead of --num_inference_steps, for pipelines that take "
                             "them (a consistency model: --timesteps 24 0 is two steps through sigma 0.82)")
    parser.add_argument("--scheduler", choices=("saved", "ddpm", "ddim"), default="saved",
                        help="unconditional pixel models: sample with the saved scheduler, DDPM's ancestral steps "
                             "(DDPMPipeline) or DDIM (DDIMPipeline, with --eta), on the saved training schedule")
    parser.add_argument("--renoise", choices=("matched", "independent"), default=None,
                        help="how a stochastic sampler (DDPM, DDIM with eta > 0, multistep consistency sampling) "
                             "re-noises: matched pairs the noise with the clean estimates as training did "
                             "(default for a model whose folder records a noise coupling); independent is stock")
    parser.add_argument("--matched_steps", type=matched_steps_value, default=None,
                        help="with matched re-noising: couple the first N re-noisings of each sampling run, or "
                             "'all' (default: immiscible_pipeline's measured 5)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses noise seeded from (seed, i)")
    parser.add_argument("--prompts", nargs="+", default=None, help="text-conditioned pipelines: one prompt per class")
    parser.add_argument("--prompts_file", default=None, help="the class prompts, one per line")
    parser.add_argument("--samples_per_class", type=int, default=None,
                        help="images per class prompt (overrides --num_samples)")
    parser.add_argument("--class_weights", type=float, nargs="+", default=None,
                        help="a class distribution for --num_samples (default: uniform)")
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--save_images", default=None, help="write the generated images here as PNG files")
    parser.add_argument("--sample_only", action="store_true", help="only generate (needs --save_images); no metrics")
    parser.add_argument("--output_json", default=None, help="default: <model or images>/evaluation.json")
    parser.add_argument("--cache_dir", default=None,
                        help="classifier and reference features cache (default: $IMMISCIBLE_CACHE or "
                             "~/.cache/immiscible_pipeline)")
    parser.add_argument("--classifier_steps", type=int, default=1500, help="training steps of the classifier")
    parser.add_argument("--kid_subsets", type=int, default=100)
    parser.add_argument("--kid_subset_size", type=int, default=1000)
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="dtype of the pipeline weights for sampling")
    args = parser.parse_args(argv)
    if args.prompts and args.prompts_file:
        parser.error("give --prompts or --prompts_file, not both")
    if args.sample_only and (args.images or not args.save_images):
        parser.error("--sample_only needs --model and --save_images")
    if args.num_samples < 2 and not args.sample_only and args.samples_per_class is None:
        parser.error("--num_samples must be >= 2 for FID")
    if args.timesteps and args.num_inference_steps and len(args.num_inference_steps) > 1:
        parser.error("--timesteps gives one sampler: give at most one --num_inference_steps with it")
    if args.matched_steps is not None and args.renoise == "independent":
        parser.error("--matched_steps goes with matched re-noising, not --renoise independent")
    if args.num_inference_steps is not None and min(args.num_inference_steps) < 1:
        parser.error(f"--num_inference_steps must be >= 1, got {args.num_inference_steps}")
    if args.sample_only and args.num_inference_steps is not None and len(args.num_inference_steps) > 1:
        parser.error("--sample_only writes one set of images: give one --num_inference_steps")
    return args


def matched_steps_value(text: str):
    """--matched_steps: a count >= 0, or "all" (as the string "all")."""
    if text == "all":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a count >= 0 or 'all', got {text!r}")
    return int(text)


def effective_matched_steps(value) -> int | None:
    """What matched_renoise gets: the library's default without the flag, the count, or None for 'all'."""
    from ..renoise import DEFAULT_MATCHED_STEPS

    if value is None:
        return DEFAULT_MATCHED_STEPS
    return None if value == "all" else value


def load_prompts(args):
    from .sampling import class_prompts

    texts = args.prompts
    if args.prompts_file:
        with open(args.prompts_file) as handle:
            texts = [line.strip() for line in handle if line.strip()]
    if not texts:
        return None
    return class_prompts(texts, num_images=None if args.samples_per_class else args.num_samples,
                         per_class=args.samples_per_class, weights=args.class_weights)


def default_inference_steps(pipeline) -> list[int]:
    """One- and two-step sampling for a consistency model (its sampler allows at most its 40 levels), 50 for
    DDIM and the like."""
    return [1, 2] if type(pipeline).__name__ == "ConsistencyModelPipeline" else [50]


def load_pipeline(args, accelerator):
    import torch
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(args.model).to(accelerator.device)
    pipeline = with_scheduler(pipeline, args.scheduler)
    return pipeline if args.dtype == "float32" else pipeline.to(dtype=getattr(torch, args.dtype))


def with_scheduler(pipeline, choice: str):
    """The pipeline as saved, or its UNet in DDPMPipeline / DDIMPipeline on the saved training schedule."""
    if choice == "saved":
        return pipeline
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    kind = type(pipeline).__name__
    if kind not in ("DDIMPipeline", "DDPMPipeline"):
        raise SystemExit(f"--scheduler {choice} samples unconditional DDPM / DDIM pixel models; {kind} keeps its own "
                         "(use --scheduler saved)")
    classes = {"ddpm": (DDPMPipeline, DDPMScheduler), "ddim": (DDIMPipeline, DDIMScheduler)}
    pipeline_class, scheduler_class = classes[choice]
    swapped = pipeline_class(unet=pipeline.unet, scheduler=scheduler_class.from_config(pipeline.scheduler.config))
    swapped.register_to_config(_name_or_path=pipeline.name_or_path)  # where its coupling record lies
    return swapped


def set_renoise(args, pipeline, steps: list[int]) -> str:
    """Matched re-noising for a model trained with noise assignment unless --renoise independent; says which,
    and warns once where independent re-noising meets such a model."""
    from ..renoise import TrainingCoupling, matched_renoise, warn_if_independent

    coupling = TrainingCoupling.load(args.model)
    renoise = args.renoise or ("matched" if coupling is not None and coupling.is_coupled else "independent")
    if renoise == "matched" and coupling is None:
        raise SystemExit(f"--renoise matched: {args.model} has no immiscible_coupling.json (a model trained "
                         "without noise assignment, or by another trainer): there is no coupling to match")
    if renoise == "matched":
        matched_renoise(pipeline, coupling, effective_matched_steps(args.matched_steps))
    warned = set()
    for num_steps in steps:
        warn_if_independent(coupling, pipeline.scheduler, renoise, args.eta, num_steps, warned)
    return renoise


def score_folder(args, reference, extractor_args) -> dict:
    """Metrics of an existing image folder (single process)."""
    from PIL import Image

    from .pipeline_metrics import build_feature_extractor
    from .fid_kid import fid_kid
    from ..data import image_files
    from .reference_images import ReferenceSpec, load_reference_images
    from .reference_features import reference_features

    files = image_files(args.images)
    if len(files) < 2:
        raise SystemExit(f"{args.images} holds {len(files)} images; FID needs at least 2")
    with Image.open(files[0]) as first:
        resolution, channels = min(first.size), (1 if first.mode in ("L", "1", "I;16") else 3)
    extractor = build_feature_extractor(args.feature, reference, resolution, channels, **extractor_args)
    images, _ = load_reference_images(ReferenceSpec(args.images), resolution, channels)
    fake = extractor.extract(images)
    real, record = reference_features(reference, extractor, resolution, channels, args.num_reference or None,
                                      args.cache_dir)
    result = fid_kid(real, fake, args.kid_subsets, args.kid_subset_size, seed=args.seed)
    if hasattr(extractor, "confident_fraction"):
        result.update(confident_fraction=extractor.confident_fraction(fake),
                      reference_confident_fraction=extractor.confident_fraction(real))
    result.update(feature=extractor.name, reference=reference.name, reference_split=reference.split,
                  resolution=resolution, channels=channels, reference_from_cache=record["from_cache"])
    accuracy = getattr(extractor, "info", {}).get("test_accuracy")
    if accuracy is not None:
        result["classifier_test_accuracy"] = accuracy
    return result


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    from accelerate import Accelerator

    from .classifier import ClassifierTraining
    from .pipeline_metrics import evaluate_pipeline
    from .reference_images import ReferenceSpec
    from .sampling import sample_images

    reference = ReferenceSpec(args.reference, args.reference_split, args.reference_config_name,
                              args.reference_image_column, args.reference_label_column)
    extractor_args = {"cache_dir": args.cache_dir,
                      "classifier_settings": ClassifierTraining(steps=args.classifier_steps)}
    if args.images:
        result = score_folder(args, reference, extractor_args)
        is_main = True
    else:
        accelerator = Accelerator()
        is_main = accelerator.is_main_process
        pipeline = load_pipeline(args, accelerator)
        steps = args.num_inference_steps or default_inference_steps(pipeline)
        if args.timesteps:
            steps = [len(args.timesteps)]  # recorded as the step count; the timesteps decide
        pipeline_kwargs = {"timesteps": args.timesteps} if args.timesteps else None
        renoise = set_renoise(args, pipeline, steps)
        if is_main:
            from ..renoise import injects_noise

            deterministic = not any(injects_noise(pipeline.scheduler, args.eta, n) for n in steps)
            print(f"sampling with {type(pipeline.scheduler).__name__}, "
                  f"{'deterministic (nothing re-noised)' if deterministic else renoise + ' re-noising'}")
        prompts = load_prompts(args)
        num_samples = len(prompts.prompts) if prompts is not None else args.num_samples
        if args.sample_only:
            sample_images(pipeline, num_samples, batch_size=args.batch_size, seed=args.seed,
                          num_inference_steps=steps[0], eta=args.eta,
                          prompts=prompts.prompts if prompts else None, guidance_scale=args.guidance_scale,
                          accelerator=accelerator, output_dir=args.save_images, keep_in_memory=False,
                          pipeline_kwargs=pipeline_kwargs)
            if is_main:
                print(f"wrote {num_samples} images to {args.save_images} with {accelerator.num_processes} process(es)")
            return None
        results = {}
        for num_steps in steps:
            save_images = args.save_images
            if save_images is not None and len(steps) > 1:
                save_images = os.path.join(save_images, f"{num_steps}-step")
            results[num_steps] = evaluate_pipeline(
                pipeline, reference, num_samples, feature=args.feature, num_reference=args.num_reference or None,
                batch_size=args.batch_size, seed=args.seed, num_inference_steps=num_steps, eta=args.eta,
                prompts=prompts.prompts if prompts else None, guidance_scale=args.guidance_scale,
                accelerator=accelerator, output_dir=save_images, kid_subsets=args.kid_subsets,
                kid_subset_size=args.kid_subset_size, pipeline_kwargs=pipeline_kwargs, **extractor_args)
        # One step count: its record, as always; several: one record per count, keyed by it.
        result = results[steps[0]] if len(steps) == 1 else {
            "num_inference_steps": steps, "results": {str(n): record for n, record in results.items()}}
        result.update(scheduler=type(pipeline.scheduler).__name__, renoise=renoise, eta=args.eta,
                      timesteps=args.timesteps)
        if renoise == "matched":
            count = effective_matched_steps(args.matched_steps)
            result["matched_steps"] = "all" if count is None else count
    if is_main:
        source = args.model or args.images
        result["source"] = os.path.abspath(source)
        path = args.output_json or os.path.join(source, "evaluation.json")
        with open(path, "w") as handle:
            json.dump(result, handle, indent=2)
        for record in (result["results"].values() if "results" in result else [result]):
            print_metrics(record, reference)
        print(f"wrote {path}")
    return result


def print_metrics(record: dict, reference) -> None:
    accuracy = record.get("classifier_test_accuracy")
    feature = record["feature"] + (f" (test accuracy {accuracy:.4f})" if accuracy is not None else "")
    steps = f"{record['num_inference_steps']}-step sampling: " if "num_inference_steps" in record else ""
    print(f"{steps}FID {record['fid']:.4f}  KID {record['kid_mean']:.6f} +- {record['kid_std']:.6f}  "
          f"({record['num_fake']} samples vs {record['num_real']} reference images of "
          f"{reference.name}:{reference.split}, features: {feature})")
    if "confident_fraction" in record:
        print(f"{steps}classifier confidence >= 0.9 for {record['confident_fraction']:.3f} of the samples "
              f"({record['reference_confident_fraction']:.3f} of the reference images)")

