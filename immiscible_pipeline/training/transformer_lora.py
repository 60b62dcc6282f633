"""LoRA on an SD3 or Flux transformer with peft, saved as diffusers' LoRA scripts save it
(`pytorch_lora_weights.safetensors` with the adapter's rank and alpha as metadata), so that plain diffusers
loads it: `StableDiffusion3Pipeline.from_pretrained(base).load_lora_weights(folder)` (or FluxPipeline).

    modules = lora_target_modules(family.lora_target_modules, args.lora_layers, args.lora_blocks)
    parameters = add_transformer_lora(transformer, rank=4, alpha=4, dropout=0.0, target_modules=modules)
    register_transformer_lora_hooks(accelerator, family.pipeline_class)   # checkpoints hold the LoRA file
    ...train parameters...
    save_transformer_lora(family.pipeline_class, accelerator.unwrap_model(transformer), output_dir)

As in `lora.py` (the UNet's LoRA): Gaussian init of the down matrix, the up matrix at zero (step 0 is the base
model), the frozen base in its dtype and the adapter in float32.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .lora import LORA_WEIGHTS_NAME


def lora_target_modules(default: tuple, lora_layers: str | None = None, lora_blocks: str | None = None) -> list[str]:
    """The module names to adapt: `default`, or the comma-separated --lora_layers; restricted to the
    comma-separated transformer block numbers of --lora_blocks (SD3's `transformer_blocks.N.`), as diffusers'
    scripts read these flags."""
    modules = [name.strip() for name in lora_layers.split(",") if name.strip()] if lora_layers else list(default)
    if not modules:
        raise ValueError(f"--lora_layers {lora_layers!r} names no module")
    if lora_blocks:
        try:
            blocks = [int(block) for block in lora_blocks.split(",") if block.strip()]
        except ValueError:
            raise ValueError(f"--lora_blocks must be comma-separated block numbers, e.g. '0,12', got "
                             f"{lora_blocks!r}") from None
        modules = [f"transformer_blocks.{block}.{module}" for block in blocks for module in modules]
    return modules


def add_transformer_lora(transformer, rank: int, alpha: float | None = None, dropout: float = 0.0,
                         target_modules=()) -> list[torch.nn.Parameter]:
    """Freezes `transformer` and adds a peft LoRA adapter (rank, alpha (default: rank), dropout) on
    `target_modules`; returns the adapter's parameters in float32. A module list that matches nothing in the
    transformer raises a ValueError naming --lora_layers / --lora_blocks."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"the LoRA rank must be at least 1, got {rank}")
    transformer.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout,
                        init_lora_weights="gaussian", target_modules=list(target_modules))
    try:
        transformer.add_adapter(config)
    except ValueError as error:
        raise ValueError(f"--lora_layers / --lora_blocks: {list(target_modules)[:4]}... match no module of the "
                         f"{type(transformer).__name__} ({error})") from error
    cast_training_params(transformer, dtype=torch.float32)
    return [param for param in transformer.parameters() if param.requires_grad]


def save_transformer_lora(pipeline_class, transformer, folder: str | os.PathLike) -> Path:
    """Writes `folder/pytorch_lora_weights.safetensors` with the pipeline class's LoRA saver (keys
    `transformer.*`, plus the adapter config as metadata); returns its path."""
    from diffusers.training_utils import _collate_lora_metadata
    from peft.utils import get_peft_model_state_dict

    pipeline_class.save_lora_weights(save_directory=str(folder),
                                     transformer_lora_layers=get_peft_model_state_dict(transformer),
                                     safe_serialization=True, **_collate_lora_metadata({"transformer": transformer}))
    return Path(folder) / LORA_WEIGHTS_NAME


def load_transformer_lora(pipeline_class, transformer, folder: str | os.PathLike) -> None:
    """Puts the weights `save_transformer_lora` wrote back into `transformer`'s adapter, exactly (for resuming)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state = pipeline_class.lora_state_dict(str(folder), weight_name=LORA_WEIGHTS_NAME)
    state = state[0] if isinstance(state, tuple) else state
    weights = {key.removeprefix("transformer."): value for key, value in state.items()
               if key.startswith("transformer.")}
    result = set_peft_model_state_dict(transformer, convert_unet_state_dict_to_peft(weights), adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{Path(folder) / LORA_WEIGHTS_NAME} does not fit this transformer's LoRA adapter (another "
                         f"rank, layer list or model?): unexpected keys such as {result.unexpected_keys[0]}")


def register_transformer_lora_hooks(accelerator, pipeline_class) -> None:
    """Checkpoints of a LoRA run hold `pytorch_lora_weights.safetensors` instead of the whole transformer;
    `accelerator.load_state` loads it back. Register before `accelerator.prepare`."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                save_transformer_lora(pipeline_class, accelerator.unwrap_model(model), output_dir)
        while weights:  # saved above; Accelerate need not save the frozen base again
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            load_transformer_lora(pipeline_class, accelerator.unwrap_model(models.pop()), input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
