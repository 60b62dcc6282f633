"""Pieces of the latent Stable Diffusion trainer that are not about data, prompts or LoRA: checking the
pretrained model, the image resize filter, the inference scheduler, and a StableDiffusionPipeline from trained
parts."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..data import ImageTransform

SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
INTERPOLATIONS = {"nearest": Image.NEAREST, "box": Image.BOX, "bilinear": Image.BILINEAR, "hamming": Image.HAMMING,
                  "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}


def check_pretrained_model(name_or_path: str, revision: str | None = None) -> None:
    """Raises a ValueError saying what is wrong with --pretrained_model_name_or_path before anything loads:
    a folder that does not exist or lacks parts of a Stable Diffusion model, or a Hub repo that cannot be
    reached (no network, gated, misspelt)."""
    flag = f"--pretrained_model_name_or_path {name_or_path}"
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        missing = [part for part in SD_SUBFOLDERS if not (path / part).is_dir()]
        if missing:
            raise ValueError(f"{flag} is a folder but not a Stable Diffusion model: it has no {', '.join(missing)} "
                             f"sub-folder(s) (expected the layout of a diffusers SD repository: "
                             f"{', '.join(SD_SUBFOLDERS)})")
        return
    looks_like_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    if path.exists() or not looks_like_hub_id:
        raise ValueError(f"{flag}: no such folder (a Hub model is named like 'CompVis/stable-diffusion-v1-4')")
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(name_or_path, "model_index.json", revision=revision)
    except Exception as error:  # offline, gated, missing: each raises its own type
        raise ValueError(f"{flag}: not a local folder, and the Hub repo could not be read "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Pass a "
                         f"local folder, or check the name, your network and `huggingface-cli login`.") from error



class FilteredImageTransform(ImageTransform):
    """`data.ImageTransform` with a choice of resize filter (`interpolation`, a key of INTERPOLATIONS): the
    image is first resized with that filter so that its shorter side is the resolution, which leaves
    nothing for the parent's bilinear resize to do."""

    def __init__(self, resolution: int, channels: int = 3, center_crop: bool = False, random_flip: bool = False,
                 interpolation: str = "bilinear"):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        super().__init__(resolution, channels, center_crop, random_flip)
        self.interpolation = interpolation

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        scale = self.resolution / min(image.size)
        size = tuple(max(self.resolution, round(side * scale)) for side in image.size)
        if size != image.size:
            image = image.resize(size, INTERPOLATIONS[self.interpolation])
        return super().__call__(image, generator)


def load_inference_scheduler(name_or_path: str, revision: str | None = None, prediction_type: str | None = None):
    """The sampling scheduler the pretrained pipeline ships (e.g. PNDM for SD v1), set to the trained
    prediction type so the saved pipeline samples with the objective it was trained on."""
    import diffusers
    from diffusers import DiffusionPipeline

    _, class_name = DiffusionPipeline.load_config(name_or_path, revision=revision)["scheduler"]
    scheduler = getattr(diffusers, class_name).from_pretrained(name_or_path, subfolder="scheduler", revision=revision)
    if prediction_type is not None:
        scheduler.register_to_config(prediction_type=prediction_type)
    return scheduler


def stable_diffusion_pipeline(unet, vae, text_encoder, tokenizer, scheduler):
    """A StableDiffusionPipeline from trained parts, safety checker off (research checkpoints; add one
    for deployment)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
