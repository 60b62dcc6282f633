"""Rectified-flow training of SD3 and Flux transformers, as diffusers' `train_dreambooth_lora_sd3.py` and
`train_dreambooth_lora_flux.py` do it, with the noise drawn (and assigned) on the unpacked latents:

    family = flow_family(args.pretrained_model_name_or_path)        # FLOW_FAMILIES["sd3"] or ["flux"]
    noise = immiscible(latents)                                     # [B, C, H, W]: before any packing
    timesteps, sigmas = sample_timesteps(scheduler, len(latents), "logit_normal", device=latents.device)
    noisy = interpolate(latents, noise, sigmas)                     # (1 - s) x0 + s z
    model_pred = family.predict(transformer, noisy, timesteps, text)   # Flux packs inside, and unpacks
    loss = flow_matching_loss(model_pred, latents, noise, noisy, sigmas, "logit_normal")

The timestep density and loss weighting are diffusers' own (`compute_density_for_timestep_sampling`,
`compute_loss_weighting_for_sd3`); the target is built from the noise that was actually mixed in (with
Immiscible Diffusion: the assigned noise): `noise - latents`, or the latents themselves with SD3's
`--precondition_outputs 1` (the prediction is then turned into an x0 estimate first).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


@dataclass(frozen=True)
class FlowFamily:
    """What differs between SD3 and Flux: the pipeline class, the defaults of diffusers' script for it, and
    how the transformer is called."""

    name: str
    pipeline_class_name: str
    weighting_scheme: str  # diffusers' default for this family's script
    max_sequence_length: int  # T5 tokens, diffusers' default for this family's script
    lora_target_modules: tuple
    clip_text_encoders: tuple  # what --train_text_encoder adapts (T5 stays frozen, as in diffusers' scripts)

    @property
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def predict(self, transformer, noisy: torch.Tensor, timesteps: torch.Tensor, text: dict,
                guidance_scale: float | None = None) -> torch.Tensor:
        """The transformer's velocity prediction for `noisy` latents [B, C, H, W], in the same layout."""
        if self.name == "sd3":
            return transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=text["prompt_embeds"],
                               pooled_projections=text["pooled_prompt_embeds"], return_dict=False)[0]
        return flux_predict(transformer, noisy, timesteps, text, guidance_scale)


# The attention (and, for Flux, feed-forward) projections diffusers' LoRA scripts adapt by default.
SD3_LORA_MODULES = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                    "attn.to_out.0", "attn.to_q", "attn.to_v")
FLUX_LORA_MODULES = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2")

FLOW_FAMILIES = {
    "sd3": FlowFamily("sd3", "StableDiffusion3Pipeline", "logit_normal", 77, SD3_LORA_MODULES,
                      ("text_encoder", "text_encoder_2")),
    "flux": FlowFamily("flux", "FluxPipeline", "none", 512, FLUX_LORA_MODULES, ("text_encoder",)),
}
PIPELINE_FAMILIES = {family.pipeline_class_name: family for family in FLOW_FAMILIES.values()}


def flow_family(name_or_path: str, revision: str | None = None) -> FlowFamily:
    """The family of a pretrained model, from its `model_index.json` (a local folder or a Hub repo); a
    ValueError naming --pretrained_model_name_or_path says what is wrong otherwise."""
    flag = f"--pretrained_model_name_or_path {name_or_path}"
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ValueError(f"{flag} is a folder without model_index.json: not a diffusers pipeline folder")
    else:
        looks_like_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
        if path.exists() or not looks_like_hub_id:
            raise ValueError(f"{flag}: no such folder (a Hub model is named like 'black-forest-labs/FLUX.1-dev')")
        from huggingface_hub import hf_hub_download

        try:
            index = Path(hf_hub_download(name_or_path, "model_index.json", revision=revision))
        except Exception as error:  # offline, gated, missing: each raises its own type
            raise ValueError(f"{flag}: not a local folder, and the Hub repo could not be read "
                             f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Pass a "
                             f"local folder, or check the name, your network and `huggingface-cli login`.") from error
    class_name = json.loads(index.read_text()).get("_class_name")
    if class_name not in PIPELINE_FAMILIES:
        hint = " (for Stable Diffusion 1.x/2.x use train_immiscible_sd.py)" if class_name == "StableDiffusionPipeline" \
            else ""
        raise ValueError(f"{flag} is a {class_name}; this trainer takes a "
                         f"{' or '.join(PIPELINE_FAMILIES)}{hint}")
    return PIPELINE_FAMILIES[class_name]


def sample_timesteps(scheduler, batch_size: int, weighting_scheme: str, logit_mean: float = 0.0,
                     logit_std: float = 1.0, mode_scale: float = 1.29, device=None):
    """(timesteps, sigmas) of a batch: u ~ the scheme's density (diffusers' `compute_density_for_timestep_sampling`,
    from the global RNG, so a resumed run draws the same), mapped to the nearest of the training scheduler's
    `num_train_timesteps` levels (with its shift), as diffusers' flow scripts do. Sigmas are in [0, 1], one per
    sample."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"--weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {weighting_scheme!r}")
    u = compute_density_for_timestep_sampling(weighting_scheme, batch_size, logit_mean, logit_std, mode_scale)
    indices = (u * scheduler.config.num_train_timesteps).long().clamp(max=scheduler.config.num_train_timesteps - 1)
    return scheduler.timesteps[indices].to(device), scheduler.sigmas[indices].to(device)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype).reshape(-1, *[1] * (like.ndim - 1))


def interpolate(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The rectified-flow point between data and noise: (1 - sigma) x0 + sigma z, sigma per sample."""
    sigmas = _per_sample(sigmas, latents)
    return (1.0 - sigmas) * latents + sigmas * noise


def flow_target(latents: torch.Tensor, noise: torch.Tensor, precondition_outputs: bool = False) -> torch.Tensor:
    """What the (preconditioned) prediction is compared with: the velocity `noise - latents`, or the latents
    for SD3's --precondition_outputs. `noise` must be the noise that was mixed in (the assigned noise)."""
    return latents if precondition_outputs else noise - latents


def flow_matching_loss(model_pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, noisy: torch.Tensor,
                       sigmas: torch.Tensor, weighting_scheme: str, precondition_outputs: bool = False) -> torch.Tensor:
    """diffusers' flow loss: per-sample mean of weight(sigma) * (prediction - target)^2, averaged over the batch.
    With `precondition_outputs` the velocity prediction becomes an x0 estimate (noisy - sigma * v) first."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    model_pred = model_pred.float()
    sigmas = _per_sample(sigmas, model_pred)
    if precondition_outputs:
        model_pred = model_pred * (-sigmas) + noisy.float()
    weighting = compute_loss_weighting_for_sd3(weighting_scheme, sigmas)
    target = flow_target(latents.float(), noise.float(), precondition_outputs)
    return (weighting * (model_pred - target) ** 2).reshape(len(target), -1).mean(1).mean()


def flux_predict(transformer, noisy: torch.Tensor, timesteps: torch.Tensor, text: dict,
                 guidance_scale: float | None = None) -> torch.Tensor:
    """Flux's forward pass on unpacked latents [B, C, H, W]: packed into 2x2 patches (tokens), with the image
    position ids, the guidance embedding (FLUX.1-dev; None for models without one) and timesteps / 1000 as the
    pipeline passes them; the prediction is unpacked back to [B, C, H, W]."""
    from diffusers import FluxPipeline

    batch, channels, height, width = noisy.shape
    packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
    image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
    guidance = None
    if getattr(transformer, "module", transformer).config.guidance_embeds:  # (DDP wraps the model in .module)
        guidance = torch.full((batch,), float(3.5 if guidance_scale is None else guidance_scale),
                              device=noisy.device, dtype=torch.float32)
    prediction = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                             pooled_projections=text["pooled_prompt_embeds"],
                             encoder_hidden_states=text["prompt_embeds"], txt_ids=text["text_ids"], img_ids=image_ids,
                             return_dict=False)[0]
    # _unpack_latents works in pixels: the latent size times the VAE factor it then divides by (1 here).
    return FluxPipeline._unpack_latents(prediction, height, width, 1)
