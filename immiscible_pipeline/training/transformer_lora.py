"""LoRA on an SD3 or Flux transformer (and with --train_text_encoder on the CLIP text encoders) with peft, saved as
diffusers' LoRA scripts save it (`pytorch_lora_weights.safetensors` with the adapters' rank and alpha as
metadata), so that plain diffusers
loads it: `StableDiffusion3Pipeline.from_pretrained(base).load_lora_weights(folder)` (or FluxPipeline).

    modules = lora_target_modules(family.lora_target_modules, args.lora_layers, args.lora_blocks)
    parameters = add_transformer_lora(transformer, rank=4, alpha=4, dropout=0.0, target_modules=modules)
    parameters += add_text_encoder_lora(text_encoder, rank=4, alpha=4)       # with --train_text_encoder
    register_lora_hooks(accelerator, family.pipeline_class, {"text_encoder": text_encoder})   # checkpoints
    ...train parameters...
    save_lora(family.pipeline_class, {"transformer": accelerator.unwrap_model(transformer),
                                      "text_encoder": text_encoder}, output_dir)

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
        modules = list(target_modules)
        shown = ", ".join(modules[:4]) + (f" and {len(modules) - 4} more" if len(modules) > 4 else "")
        raise ValueError(f"--lora_layers / --lora_blocks: {shown} match no module of the {type(transformer).__name__} "
                         f"({error})") from error
    cast_training_params(transformer, dtype=torch.float32)
    return [param for param in transformer.parameters() if param.requires_grad]


TEXT_ENCODER_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP's attention, as diffusers' scripts


def add_text_encoder_lora(text_encoder, rank: int, alpha: float | None = None) -> list[torch.nn.Parameter]:
    """A LoRA (alpha default: rank; Gaussian init) on a CLIP text encoder's attention projections, as diffusers'
    --train_text_encoder adds it; returns its parameters in float32, the rest of the encoder frozen. peft's own
    `inject_adapter_in_model`: transformers 5's `add_adapter` wants a newer peft than the registries offer."""
    from diffusers.training_utils import cast_training_params
    from peft import inject_adapter_in_model, LoraConfig

    text_encoder.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, init_lora_weights="gaussian",
                        target_modules=list(TEXT_ENCODER_LORA_MODULES))
    inject_adapter_in_model(config, text_encoder, "default")
    cast_training_params(text_encoder, dtype=torch.float32)
    return [param for param in text_encoder.parameters() if param.requires_grad]


def save_lora(pipeline_class, modules: dict, folder: str | os.PathLike) -> Path:
    """Writes `folder/pytorch_lora_weights.safetensors` with the pipeline class's LoRA saver from `modules`
    ({"transformer": ..., and with --train_text_encoder "text_encoder" (, "text_encoder_2")}: keys `<name>.*`, the
    adapters' configs as metadata); returns its path."""
    from diffusers.training_utils import _collate_lora_metadata
    from peft.utils import get_peft_model_state_dict

    layers = {f"{name}_lora_layers": get_peft_model_state_dict(module) for name, module in modules.items()}
    pipeline_class.save_lora_weights(save_directory=str(folder), safe_serialization=True, **layers,
                                     **_collate_lora_metadata(modules))
    return Path(folder) / LORA_WEIGHTS_NAME


def load_lora(pipeline_class, modules: dict, folder: str | os.PathLike) -> None:
    """Puts the weights `save_lora` wrote back into the adapters of `modules`, exactly (for resuming)."""
    from diffusers.training_utils import _set_state_dict_into_text_encoder
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state = pipeline_class.lora_state_dict(str(folder), weight_name=LORA_WEIGHTS_NAME)
    state = state[0] if isinstance(state, tuple) else state
    for name, module in modules.items():
        if name != "transformer":
            _set_state_dict_into_text_encoder(state, prefix=f"{name}.", text_encoder=module)
            continue
        weights = {key.removeprefix("transformer."): value for key, value in state.items()
                   if key.startswith("transformer.")}
        result = set_peft_model_state_dict(module, convert_unet_state_dict_to_peft(weights), adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{Path(folder) / LORA_WEIGHTS_NAME} does not fit this transformer's LoRA adapter "
                             f"(another rank, layer list or model?): unexpected keys such as "
                             f"{result.unexpected_keys[0]}")


def register_lora_hooks(accelerator, pipeline_class, text_encoders: dict | None = None) -> None:
    """Checkpoints of a LoRA run hold `pytorch_lora_weights.safetensors` (the prepared transformer's adapter and
    those of `text_encoders`, {"text_encoder": module, ...}, trained outside `accelerator.prepare`) instead of the
    whole models; `accelerator.load_state` loads it back. Register before `accelerator.prepare`."""
    text_encoders = text_encoders or {}

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                save_lora(pipeline_class, {"transformer": accelerator.unwrap_model(model), **text_encoders},
                          output_dir)
        while weights:  # saved above; Accelerate need not save the frozen base again
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            load_lora(pipeline_class, {"transformer": accelerator.unwrap_model(models.pop()), **text_encoders},
                      input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def average_gradients(parameters, accelerator) -> None:
    """Averages the gradients of `parameters` over the processes: for adapters trained outside
    `accelerator.prepare` (the text encoders, called through the pipeline's `encode_prompt`, so DDP does not see
    them). Call on every process after the backward pass of a step's last micro-batch."""
    if accelerator.num_processes == 1:
        return
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)  # unused here this step: every process must take part
        parameter.grad = accelerator.reduce(parameter.grad, "mean")
