"""LoRA on a Stable Diffusion UNet with peft, saved in diffusers' LoRA format (`pytorch_lora_weights.safetensors`),
so that plain diffusers loads it: `StableDiffusionPipeline.from_pretrained(base).load_lora_weights(folder)`.

    lora_parameters = add_unet_lora(unet, rank=4)        # base frozen; LoRA matrices trainable, in float32
    register_lora_checkpoint_hooks(accelerator)          # checkpoints hold the LoRA file; resume loads it back
    ...train lora_parameters...
    save_unet_lora(accelerator.unwrap_model(unet), output_dir)

The layout and the initialisation are those of diffusers' `train_text_to_image_lora.py`: rank r on the attention
projections, alpha = r, Gaussian init of the down matrix (the up matrix starts at zero, so step 0 is the base
model).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

LORA_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # the file `load_lora_weights` looks for


def add_unet_lora(unet, rank: int, target_modules=LORA_TARGET_MODULES) -> list[torch.nn.Parameter]:
    """Freezes `unet` (left in its dtype) and adds a peft LoRA adapter of `rank`, alpha = rank, on the
    attention projections; returns the adapter's parameters, cast to float32 (an fp16 optimiser step would
    round the small updates away)."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"the LoRA rank must be at least 1, got {rank}")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=list(target_modules)))
    cast_training_params(unet, dtype=torch.float32)
    return [param for param in unet.parameters() if param.requires_grad]


def unet_lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter's weights under diffusers' LoRA key names (what `save_lora_weights` takes)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_unet_lora(unet, folder: str | os.PathLike) -> Path:
    """Writes `folder/pytorch_lora_weights.safetensors` with diffusers' SD LoRA saver; returns its path."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(save_directory=str(folder), unet_lora_layers=unet_lora_state_dict(unet),
                                              safe_serialization=True)
    return Path(folder) / LORA_WEIGHTS_NAME


def load_unet_lora(unet, folder: str | os.PathLike) -> None:
    """Puts the LoRA weights `save_unet_lora` wrote back into `unet`'s adapter, exactly (for resuming)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state, _ = StableDiffusionPipeline.lora_state_dict(str(folder), weight_name=LORA_WEIGHTS_NAME)
    unet_state = {key.removeprefix("unet."): value for key, value in state.items() if key.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), adapter_name="default")
    if result.unexpected_keys:
        raise ValueError(f"{Path(folder) / LORA_WEIGHTS_NAME} does not fit this UNet's LoRA adapter (another rank or "
                         f"model?): unexpected keys such as {result.unexpected_keys[0]}")


def register_lora_checkpoint_hooks(accelerator) -> None:
    """Checkpoints of a LoRA run hold `pytorch_lora_weights.safetensors` (the prepared UNet's adapter, in the
    layout diffusers' LoRA script writes) instead of the whole UNet; `accelerator.load_state` loads it back.
    The optimiser, scheduler and RNG states are Accelerate's as usual. Register before `accelerator.prepare`."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                save_unet_lora(accelerator.unwrap_model(model), output_dir)
        while weights:  # saved above; Accelerate need not save the frozen base again
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            load_unet_lora(accelerator.unwrap_model(models.pop()), input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def base_pipeline_with_lora(base_model: str, lora_folder: str | os.PathLike, revision: str | None = None,
                            variant: str | None = None, dtype: torch.dtype = torch.float32):
    """The pretrained StableDiffusionPipeline with the LoRA in `lora_folder` loaded: what a user of the saved
    weights runs, so validation images show exactly that."""
    from diffusers import StableDiffusionPipeline

    precision = {} if dtype == torch.float32 else {"torch_dtype": dtype}  # the keyword diffusers 0.35 knows
    pipeline = StableDiffusionPipeline.from_pretrained(base_model, revision=revision, variant=variant, **precision)
    pipeline.load_lora_weights(str(lora_folder), weight_name=LORA_WEIGHTS_NAME)
    return pipeline
