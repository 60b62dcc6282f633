"""Weight and LoRA memory of SD3.5 medium and FLUX.1 [dev] for train_immiscible_sd3_flux.py, counted from their
published configs on the `meta` device (nothing is downloaded, no GPU needed).

    python benchmarks/flow_memory.py            # a few seconds

For each family: the parameters of the transformer and of each text encoder, their size in bf16 (what the
script keeps on the GPU under --mixed_precision bf16: the frozen transformer base of a LoRA, the VAE and all
text encoders), and for LoRA ranks 4-64 on diffusers' default target modules (the ones the script adapts
without --lora_layers): the LoRA parameters and what they cost in float32 with AdamW (weights, gradients and
two moments: 16 bytes a parameter). Activations are not counted: they depend on resolution, batch and
--gradient_checkpointing and need a GPU to measure.

The configs are those of the Hub repos' transformer/config.json and text encoders' config.json
(stabilityai/stable-diffusion-3.5-medium, black-forest-labs/FLUX.1-dev), written out below; the printed
transformer sizes (2.5B and 11.9B values) are the models' published sizes, a check that they are right.
"""

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SD35_MEDIUM_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                               num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                               pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                               dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
FLUX1_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                             guidance_embeds=True, axes_dims_rope=(16, 56, 56))
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, vocab_size=49408, max_position_embeddings=77, hidden_act="gelu")
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
RANKS = (4, 16, 64)


def on_meta(build):
    with torch.device("meta"):
        return build()


def count(module) -> int:
    """Parameters and buffers (SD3's position embedding, 0.23B values at pos_embed_max_size 384, is a buffer
    that the checkpoint stores and the GPU holds)."""
    return sum(tensor.numel() for tensor in (*module.parameters(), *module.buffers()))


def lora_parameters(transformer, target_modules, rank: int) -> int:
    """r * (in + out) for every Linear whose name ends with one of the target modules (peft's matching)."""
    total = 0
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in target_modules):
            total += rank * (module.in_features + module.out_features)
    return total


def main():
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from immiscible_pipeline.training.flow_matching import FLOW_FAMILIES

    t5 = count(on_meta(lambda: T5EncoderModel(T5Config(**T5_XXL))))
    clip_l = count(on_meta(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L))))
    clip_l_plain = count(on_meta(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L))))
    clip_g = count(on_meta(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))))
    families = {
        "SD3.5 medium": ("sd3", on_meta(lambda: SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER)),
                         {"CLIP-L": clip_l, "CLIP-G": clip_g, "T5-XXL": t5}),
        "FLUX.1 [dev]": ("flux", on_meta(lambda: FluxTransformer2DModel(**FLUX1_DEV_TRANSFORMER)),
                         {"CLIP-L": clip_l_plain, "T5-XXL": t5}),
    }
    gb = 1e9
    print("| model | transformer | text encoders | weights in bf16 (transformer + text encoders) | "
          + " | ".join(f"LoRA rank {rank}: parameters, float32 + AdamW" for rank in RANKS) + " |")
    print("| --- " * (4 + len(RANKS)) + "|")
    for title, (family, transformer, encoders) in families.items():
        transformer_count = count(transformer)
        encoder_text = ", ".join(f"{name} {n / 1e9:.2f}B" for name, n in encoders.items())
        weights = 2 * (transformer_count + sum(encoders.values())) / gb
        cells = []
        for rank in RANKS:
            lora = lora_parameters(transformer, FLOW_FAMILIES[family].lora_target_modules, rank)
            cells.append(f"{lora / 1e6:.1f}M, {16 * lora / gb:.2f} GB")
        print(f"| {title} | {transformer_count / 1e9:.2f}B | {encoder_text} | {weights:.1f} GB | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
