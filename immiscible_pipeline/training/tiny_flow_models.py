"""Tiny SD3 and Flux folders built from configs, for tests and CPU measurements (nothing is downloaded).

    path = build_tiny_sd3("/tmp/tiny-sd3")      # a StableDiffusion3Pipeline folder
    path = build_tiny_flux("/tmp/tiny-flux")    # a FluxPipeline folder
    DiffusionPipeline.from_pretrained(path)("a photo of a cat", num_inference_steps=2, max_sequence_length=16)

Each has the layout of the real repository (transformer, vae, scheduler, text_encoder*, tokenizer*), so
`train_immiscible_sd3_flux.py --pretrained_model_name_or_path=path` treats it like
`stabilityai/stable-diffusion-3.5-medium` or `black-forest-labs/FLUX.1-dev`. Every tokenizer slot holds the
byte-level CLIP tokenizer of `tiny_stable_diffusion` (no T5 vocabulary ships offline; it pads to any
length, so T5's `max_sequence_length` works). The VAE halves the size once (latents are resolution / 2).
"""

from __future__ import annotations

import os

import torch

from .tiny_stable_diffusion import tiny_clip_tokenizer

CLIP_WIDTH = 16  # each CLIP encoder's hidden size (and projection)
T5_WIDTH = 32  # >= the two CLIP widths together: SD3 pads the CLIP embeddings to T5's width


def _clip_config(tokenizer, hidden_size: int = CLIP_WIDTH):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                          num_hidden_layers=1, num_attention_heads=2, projection_dim=hidden_size,
                          max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _t5_encoder(tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=8, d_ff=2 * T5_WIDTH,
                                   num_layers=1, num_heads=4, relative_attention_num_buckets=8,
                                   pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=0))


def _vae(latent_channels: int, resolution: int, shift_factor: float, scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
                         layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=resolution,
                         shift_factor=shift_factor, scaling_factor=scaling_factor, use_quant_conv=False,
                         use_post_quant_conv=False)


def tiny_sd3_components(resolution: int = 32, seed: int = 0) -> dict:
    """The parts of a tiny StableDiffusion3Pipeline: a one-layer SD3Transformer2DModel (patch 2) on 4-channel
    latents, two CLIPTextModelWithProjection and a T5 encoder, a VAE with SD3's shift and scale, and SD3's
    flow-matching scheduler (shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    transformer = SD3Transformer2DModel(sample_size=resolution // 2, patch_size=2, in_channels=4, out_channels=4,
                                        num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                        joint_attention_dim=T5_WIDTH, caption_projection_dim=16,
                                        pooled_projection_dim=2 * CLIP_WIDTH, pos_embed_max_size=resolution)
    return {"transformer": transformer, "vae": _vae(4, resolution, 0.0609, 1.5305),
            "text_encoder": CLIPTextModelWithProjection(_clip_config(tokenizer)), "tokenizer": tokenizer,
            "text_encoder_2": CLIPTextModelWithProjection(_clip_config(tokenizer)), "tokenizer_2": tokenizer,
            "text_encoder_3": _t5_encoder(tokenizer), "tokenizer_3": tokenizer,
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)}


def tiny_flux_components(resolution: int = 32, seed: int = 0, guidance_embeds: bool = True) -> dict:
    """The parts of a tiny FluxPipeline: a FluxTransformer2DModel with one double and one single block on packed
    4-channel latents (16 channels once packed 2x2), with a guidance embedding as FLUX.1-dev has; a
    CLIPTextModel (pooled) and a T5 encoder; a VAE with Flux's shift and scale; Flux's scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                                         pooled_projection_dim=CLIP_WIDTH, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 4, 8))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return {"transformer": transformer, "vae": _vae(4, resolution, 0.1159, 0.3611),
            "text_encoder": CLIPTextModel(_clip_config(tokenizer)), "tokenizer": tokenizer,
            "text_encoder_2": _t5_encoder(tokenizer), "tokenizer_2": tokenizer, "scheduler": scheduler}


def build_tiny_sd3(path: str | os.PathLike, resolution: int = 32, seed: int = 0) -> str:
    """Saves a tiny StableDiffusion3Pipeline at `path` and returns the path."""
    from diffusers import StableDiffusion3Pipeline

    StableDiffusion3Pipeline(**tiny_sd3_components(resolution, seed)).save_pretrained(path)
    return str(path)


def build_tiny_flux(path: str | os.PathLike, resolution: int = 32, seed: int = 0,
                    guidance_embeds: bool = True) -> str:
    """Saves a tiny FluxPipeline at `path` and returns the path."""
    from diffusers import FluxPipeline

    FluxPipeline(**tiny_flux_components(resolution, seed, guidance_embeds), image_encoder=None,
                 feature_extractor=None).save_pretrained(path)
    return str(path)
