"""A tiny Stable Diffusion folder built from configs, for tests and CPU benchmarks (nothing is downloaded).

    path = build_tiny_sd("/tmp/tiny-sd")             # a StableDiffusionPipeline folder
    DiffusionPipeline.from_pretrained(path)("a photo of a cat", num_inference_steps=2)

The parts have the layout of a real SD v1 repository (unet, vae, text_encoder, tokenizer, scheduler), so
`train_immiscible_sd.py --pretrained_model_name_or_path=path` treats it like `CompVis/stable-diffusion-v1-4`.
The tokenizer is a byte-level CLIP BPE with no merges: every byte is a token, so any prompt encodes.
"""

from __future__ import annotations

import os

import torch

TOKENIZER_MAX_LENGTH = 32


def tiny_clip_tokenizer(model_max_length: int = TOKENIZER_MAX_LENGTH):
    """A CLIPTokenizer over the 256 byte symbols (plus their end-of-word forms), built in memory."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def tiny_sd_components(resolution: int = 16, seed: int = 0, vae_channels: tuple = (8, 16)) -> dict:
    """The five parts of a tiny SD v1-style pipeline: a VAE with one block per entry of `vae_channels`, each
    but the last halving the size (default: one 2x down-sampling, so latents are [4, resolution / 2,
    resolution / 2]; SD's VAE has 4 blocks, 128-512 channels, /8); a 2-layer CLIP text encoder of width 16; a
    2-level UNet with cross-attention."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    factor = 2 ** (len(vae_channels) - 1)
    if resolution % (2 * factor):
        raise ValueError(f"resolution must be a multiple of {2 * factor} for this VAE, got {resolution}")
    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, projection_dim=16,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(vae_channels),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels), norm_num_groups=4, sample_size=resolution)
    unet = UNet2DConditionModel(
        sample_size=resolution // factor, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
        norm_num_groups=8)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def build_tiny_sd(path: str | os.PathLike, resolution: int = 16, seed: int = 0,
                  vae_channels: tuple = (8, 16)) -> str:
    """Saves a tiny StableDiffusionPipeline (safety checker off) at `path` and returns the path."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(**tiny_sd_components(resolution, seed, vae_channels), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(path)
    return str(path)


def build_tiny_sdxl(path: str | os.PathLike, resolution: int = 16, seed: int = 0) -> str:
    """Saves a tiny StableDiffusionXLPipeline at `path` (the tiny SD VAE; a CLIPTextModel and a
    CLIPTextModelWithProjection of width 16, both with the byte-level tokenizer; a UNet with SDXL's text-time
    conditioning: cross-attention on the two encoders' concatenated states, the pooled embedding and 6 size ids;
    SDXL's Euler scheduler) and returns the path."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    parts = tiny_sd_components(resolution, seed)
    tokenizer = parts["tokenizer"]
    config = CLIPTextConfig(**{**parts["text_encoder"].config.to_dict(), "num_hidden_layers": 2})
    text_encoder_2 = CLIPTextModelWithProjection(config)
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=parts["unet"].config.sample_size, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2 * config.hidden_size,
        attention_head_dim=4, norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=config.projection_dim + 6 * time_embed_dim)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    pipeline = StableDiffusionXLPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"],
                                         text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer,
                                         unet=unet, scheduler=scheduler, add_watermarker=False)
    pipeline.save_pretrained(path)
    return str(path)
