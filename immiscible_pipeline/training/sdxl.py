"""What SDXL adds to the latent Stable Diffusion trainer: telling an SDXL model from an SD 1.x/2.x one, and the
size conditioning its UNet takes next to the pooled text embedding.

    if is_sdxl(args.pretrained_model_name_or_path):
        text = PromptEmbeddings(StableDiffusionXLPipeline.from_pretrained(base, unet=None, vae=None), 77)(prompts)
        added = {"text_embeds": text["pooled_prompt_embeds"], "time_ids": sdxl_time_ids(len(latents), resolution)}
        model_pred = unet(noisy_latents, timesteps, text["prompt_embeds"], added_cond_kwargs=added).sample
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SDXL_PIPELINE = "StableDiffusionXLPipeline"


def pipeline_class_name(name_or_path: str, revision: str | None = None) -> str | None:
    """The `_class_name` of a diffusers pipeline folder or Hub repo (its model_index.json)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        return json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(name_or_path, revision=revision).get("_class_name")


def is_sdxl(name_or_path: str, revision: str | None = None) -> bool:
    return pipeline_class_name(name_or_path, revision) == SDXL_PIPELINE


def sdxl_time_ids(batch_size: int, resolution: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """SDXL's size conditioning per sample, [B, 6]: original size, crop's top-left corner, target size. Here
    (resolution, resolution), (0, 0), (resolution, resolution): what the pipeline passes by default when it samples
    at that size (the images are resized and cropped to it before encoding, so their original sizes and crops are
    not tracked; diffusers' SDXL scripts pass the real ones)."""
    ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=device, dtype=dtype)
    return ids.expand(batch_size, 6)
