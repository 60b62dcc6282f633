"""The data and optimiser set-up of the latent, prompted trainers (written for train_immiscible_sd3_flux.py; the
same steps as train_immiscible_sd.py's): images with prompts, read from the images or from a latent cache, and
AdamW (or bitsandbytes' 8-bit AdamW) at the --scale_lr learning rate.

    add_prompted_data_arguments(parser)                  # --dataset_name ... --cache_latents
    ...
    data = load_prompted_dataset(args, accelerator, instance_prompt=args.instance_prompt)
    samples = latent_training_samples(args, data, vae, accelerator, model_settings)   # images or cached latents
    optimizer, learning_rate = make_optimizer(trainable, args, accelerator)

Shuffles, crops, flips and prompt choices are fixed by (seed, epoch, row), so runs resume exactly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .accelerator_setup import make_adamw
from .captions import Captioner, prompt_column
from ..data import describe_dataset, load_image_dataset, TrainImages
from .latent_cache import build_latent_cache, CACHE_DTYPES, CachedLatents
from .stable_diffusion import FilteredImageTransform, INTERPOLATIONS

logger = logging.getLogger(__name__)


def add_prompted_data_arguments(parser, resolution: int | None = None, default_cache_folder: str | None = None):
    """The data flags (diffusers' train_text_to_image.py / DreamBooth names): the images, where the prompts come
    from, preprocessing and the latent cache. With `default_cache_folder`, a bare --cache_latents (diffusers'
    DreamBooth switch) means that folder inside --output_dir (the trainer resolves it). Returns the group."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", type=str, default=None, help="A dataset on the Hub.")
    data.add_argument("--dataset_config_name", type=str, default=None, help="The config of --dataset_name.")
    data.add_argument("--train_data_dir", type=str, default=None,
                      help="A folder of images (diffusers' DreamBooth: --instance_data_dir); a metadata.jsonl may add "
                           "captions, class sub-folders a `label` column (datasets' imagefolder).")
    data.add_argument("--image_column", type=str, default="image", help="The dataset column holding the images.")
    data.add_argument("--caption_column", type=str, default=None,
                      help="Column giving the prompts: text (a caption or a list per row) or a ClassLabel column "
                           "(prompt from --prompt_template and the class names). Default: --instance_prompt, else "
                           "`text` as in diffusers, else the class labels.")
    data.add_argument("--instance_prompt", type=str, default=None,
                      help='One prompt for every image (e.g. "a photo of sks dog"), for a folder of a few images of '
                           "one thing without captions.")
    data.add_argument("--prompt_template", type=str, default="a photo of a {}",
                      help="Prompt for a class-label column; {} is replaced by the class name.")
    data.add_argument("--class_name_synonyms", type=str, default="first", choices=["first", "random", "all"],
                      help="Class names with comma-separated synonyms: use the first, a random one per sample, or "
                           "the whole name.")
    data.add_argument("--caption_dropout", type=float, default=0.0,
                      help="Fraction of prompts replaced by the empty prompt, for classifier-free guidance.")
    data.add_argument("--max_train_samples", type=int, default=None,
                      help="Train on a random subset of this many rows (fixed by --seed).")
    data.add_argument("--cache_dir", type=str, default=None, help="Where datasets are downloaded and cached.")
    data.add_argument("--resolution", type=int, default=resolution, help="Training (and validation) resolution.")
    data.add_argument("--center_crop", action="store_true", help="Centre crop (default: a random crop).")
    data.add_argument("--random_flip", action="store_true", help="Random horizontal flips.")
    data.add_argument("--image_interpolation_mode", type=str, default="lanczos", choices=list(INTERPOLATIONS),
                      help="Filter for resizing images to the resolution.")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading processes.")
    folder = "" if default_cache_folder is None else f" (default <output_dir>/{default_cache_folder})"
    data.add_argument("--cache_latents", type=str, default=None, metavar="DIR",
                      nargs=None if default_cache_folder is None else "?", const=None if default_cache_folder is None
                      else "", help=f"Encode the dataset with the VAE once into DIR{folder} (latent mean and std per "
                                    "image, and per mirrored image with --random_flip; resumable, shared across "
                                    "processes, reused by later runs with the same settings) and train from it. It "
                                    "holds centre crops.")
    data.add_argument("--cache_latents_chunk_size", type=int, default=1024,
                      help="Images per cache file: the unit of resuming an interrupted encoding.")
    data.add_argument("--cache_latents_dtype", type=str, default="float32", choices=sorted(CACHE_DTYPES),
                      help="Storage precision of the cached latent mean and std (float16 halves the size).")
    return data


@dataclass
class PromptedDataset:
    dataset: object  # a datasets.Dataset
    caption_column: str
    captioner: Captioner
    description: str
    seed: int  # fixes shuffles, augmentations and prompt choices (the same on every process)


def load_prompted_dataset(args, accelerator, instance_prompt: str | None = None) -> PromptedDataset:
    """--dataset_name or --train_data_dir, with the prompt column (`instance_prompt`, --caption_column, `text`, or the
    class labels; see `captions.prompt_column`), rows without a class dropped, --max_train_samples rows and
    `args.repeats` copies (where the trainer has that flag)."""
    description = describe_dataset(args.dataset_name, args.train_data_dir)
    with accelerator.main_process_first():
        dataset = load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir)
    dataset, caption_column = prompt_column(dataset, args.caption_column, instance_prompt)
    captioner = Captioner.for_dataset(dataset, caption_column, args.prompt_template, args.class_name_synonyms,
                                      args.caption_dropout)
    labelled = captioner.labelled_rows(dataset)
    if labelled is not None:
        logger.info("Dropping %d rows without a class (label -1)", len(dataset) - len(labelled))
        dataset = dataset.select(labelled)
    seed = args.seed if args.seed is not None else 0
    if args.max_train_samples is not None:
        dataset = dataset.shuffle(seed=seed).select(range(min(args.max_train_samples, len(dataset))))
    if getattr(args, "repeats", 1) > 1:
        import datasets

        dataset = datasets.concatenate_datasets([dataset] * args.repeats)
    return PromptedDataset(dataset, caption_column, captioner, description, seed)


def latent_training_samples(args, data: PromptedDataset, vae, accelerator, model_settings: dict):
    """`TrainImages` (resized, cropped and flipped as the flags say; encoded by the VAE every step) or, with
    --cache_latents DIR, `CachedLatents` from the cache built (or resumed, or reused) there. The cache holds centre
    crops; `model_settings` (model, variant, VAE dtype...) is stored with it, so that it is never reused for
    another model."""
    keep = [data.caption_column]
    if args.cache_latents is None:
        transform = FilteredImageTransform(args.resolution, 3, args.center_crop, args.random_flip,
                                           args.image_interpolation_mode)
        return TrainImages(data.dataset, args.image_column, transform, data.seed, keep_columns=keep)
    unflipped = FilteredImageTransform(args.resolution, 3, True, False, args.image_interpolation_mode)
    to_encode = TrainImages(data.dataset, args.image_column, unflipped, data.seed, keep_columns=keep)
    settings = {**model_settings, "vae_config": dict(vae.config), "dataset": data.description,
                "dataset_config_name": args.dataset_config_name,
                "dataset_fingerprint": getattr(data.dataset, "_fingerprint", None), "image_column": args.image_column,
                "caption_column": data.caption_column, "resolution": args.resolution,
                "interpolation": args.image_interpolation_mode}
    started = time.perf_counter()
    cache = build_latent_cache(args.cache_latents, to_encode, vae, settings, accelerator,
                               batch_size=args.train_batch_size, chunk_size=args.cache_latents_chunk_size,
                               flip=args.random_flip, dtype=args.cache_latents_dtype,
                               num_workers=args.dataloader_num_workers, caption_key=data.caption_column)
    logger.info("Latent cache %s: %d images ready in %.1f s", args.cache_latents, len(cache),
                time.perf_counter() - started)
    return CachedLatents(cache, data.seed, args.random_flip, caption_key=data.caption_column)


def make_optimizer(parameters, args, accelerator):
    """(optimizer, learning rate): --learning_rate, times processes x batch x accumulation with --scale_lr; AdamW,
    or bitsandbytes' AdamW8bit with --use_8bit_adam."""
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    if not args.use_8bit_adam:
        return make_adamw(parameters, args, accelerator.device, learning_rate), learning_rate
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(parameters, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon), learning_rate
