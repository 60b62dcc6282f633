"""diffusers' example command lines on our trainers: the flags of `train_unconditional.py` (for
train_immiscible_ddim.py) and of `train_text_to_image.py` / `train_text_to_image_lora.py` (for
train_immiscible_sd.py) that our scripts name differently or do not support, in one table per script.

    parser = argparse.ArgumentParser()
    ...our own flags...
    add_diffusers_flags(parser, TEXT_TO_IMAGE_FLAGS)      # last: aliases attach to flags already defined
    args = parser.parse_args()
    ...
    num_update_steps, num_epochs = epoch_plan(...)
    steps_from_epoch_flags(args, num_update_steps)        # --validation_epochs N -> --validation_steps

Every other flag of those scripts is one of ours already, with the same name and meaning. Each entry is one of:
- Alias: another name of one of our flags (the same argparse action, so the same type, choices and checks);
- EveryEpochs: an interval in epochs for one of our intervals in steps, converted once the epoch length is known;
- Ignored: accepted and without effect, because ours already behaves that way;
- Unsupported: refused with a ValueError naming the flag and what to use instead (never argparse's
  "unrecognized arguments").
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Alias:
    flag: str
    ours: str


@dataclass(frozen=True)
class EveryEpochs:
    flag: str
    ours: str  # the flag counting the same interval in optimisation steps

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--")


@dataclass(frozen=True)
class Ignored:
    flag: str
    why: str


@dataclass(frozen=True)
class Unsupported:
    flag: str
    instead: str


LOCAL_RANK = Ignored("--local_rank", "set by older launchers; Accelerate reads the process's rank from LOCAL_RANK")

UNCONDITIONAL_FLAGS = (
    Alias("--ddpm_num_inference_steps", "--ddim_num_inference_steps"),
    Alias("--eval_batch_size", "--num_validation_images"),
    Alias("--logger", "--report_to"),
    EveryEpochs("--save_images_epochs", "--validation_steps"),
    Unsupported("--save_model_epochs", "the pipeline is saved once, at the end; for weights along the way use "
                                       "--checkpointing_steps N (checkpoint-N/unet loads with "
                                       "UNet2DModel.from_pretrained)"),
    Unsupported("--use_auth_token", "log in with `huggingface-cli login` (or set HF_TOKEN): datasets then reads the "
                                    "token itself"),
    LOCAL_RANK,
)

TEXT_TO_IMAGE_FLAGS = (
    Alias("--validation_prompt", "--validation_prompts"),
    EveryEpochs("--validation_epochs", "--validation_steps"),
    Unsupported("--dream_training", "DREAM (arXiv 2312.00210) rebuilds the noisy input from the model's own "
                                    "prediction, which would undo the noise assignment; drop the flag"),
    Unsupported("--dream_detail_preservation", "it only tunes --dream_training, which is not supported; drop it"),
    Unsupported("--offload_ema", "the EMA stays on the training device; drop the flag (or train without --use_ema)"),
    Ignored("--foreach_ema", "the EMA always takes EMAModel's foreach update"),
    Unsupported("--non_ema_revision", "the UNet and its EMA both start from --revision; pass the revision to "
                                      "fine-tune as --revision"),
    LOCAL_RANK,
)


class _EveryEpochsAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        if values < 1:
            raise ValueError(f"{option_string} must be at least 1, got {values}")
        setattr(namespace, self.dest, values)


class _IgnoredAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        pass


class _UnsupportedAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        raise ValueError(f"{option_string} (a flag of diffusers' example scripts) is not supported: {self.const}")


def add_diffusers_flags(parser: argparse.ArgumentParser, table) -> None:
    """Adds the entries of `table` to `parser`, after the script's own flags (an alias needs its target)."""
    group = parser.add_argument_group("flags of diffusers' example scripts (see docs/train-sd.md, flag aliases)")
    for entry in table:
        if isinstance(entry, Alias):
            # One action under two names: argparse has no public call for this, so register the second name
            # the way add_argument would.
            action = parser._option_string_actions.get(entry.ours)
            if action is None:
                raise ValueError(f"alias {entry.flag}: the parser has no {entry.ours}")
            action.option_strings.append(entry.flag)
            parser._option_string_actions[entry.flag] = action
        elif isinstance(entry, EveryEpochs):
            group.add_argument(entry.flag, type=int, default=None, action=_EveryEpochsAction,
                               help=f"{entry.ours}, counted in epochs (overrides {entry.ours}).")
        elif isinstance(entry, Ignored):
            group.add_argument(entry.flag, nargs="?", default=argparse.SUPPRESS, action=_IgnoredAction,
                               help=f"Accepted, no effect: {entry.why}.")
        else:
            group.add_argument(entry.flag, nargs="?", const=entry.instead, default=argparse.SUPPRESS,
                               action=_UnsupportedAction, help=f"Not supported: {entry.instead}.")


def steps_from_epoch_flags(args, num_update_steps: int) -> None:
    """Turns the given interval-in-epochs flags into the steps their step flag counts (`num_update_steps`
    optimisation steps per epoch)."""
    for entry in (*UNCONDITIONAL_FLAGS, *TEXT_TO_IMAGE_FLAGS):
        if isinstance(entry, EveryEpochs) and getattr(args, entry.dest, None) is not None:
            setattr(args, entry.ours.removeprefix("--"), getattr(args, entry.dest) * num_update_steps)


# diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py and train_dreambooth_lora_flux.py, for
# train_immiscible_sd3_flux.py (their other flags are its own, with the same meaning).
WITHOUT_PRIOR_PRESERVATION = ("only used with --with_prior_preservation, which is not supported (diffusers' scripts "
                              "also accept it alone and only warn)")
WITHOUT_PRODIGY = "only used with --optimizer prodigy, which is not supported"
DREAMBOOTH_FLOW_FLAGS = (
    Alias("--instance_data_dir", "--train_data_dir"),
    Alias("--validation_prompt", "--validation_prompts"),
    EveryEpochs("--validation_epochs", "--validation_steps"),
    Unsupported("--with_prior_preservation", "prior preservation (class images generated by the base model, with "
                                             "their own loss) is not implemented; drop the flag"),
    Ignored("--class_data_dir", WITHOUT_PRIOR_PRESERVATION),
    Ignored("--class_prompt", WITHOUT_PRIOR_PRESERVATION),
    Ignored("--num_class_images", WITHOUT_PRIOR_PRESERVATION),
    Ignored("--prior_loss_weight", WITHOUT_PRIOR_PRESERVATION),
    Ignored("--sample_batch_size", WITHOUT_PRIOR_PRESERVATION),
    Ignored("--prior_generation_precision", WITHOUT_PRIOR_PRESERVATION),
    Ignored("--prodigy_beta3", WITHOUT_PRODIGY),
    Ignored("--prodigy_decouple", WITHOUT_PRODIGY),
    Ignored("--prodigy_use_bias_correction", WITHOUT_PRODIGY),
    Ignored("--prodigy_safeguard_warmup", WITHOUT_PRODIGY),
    Ignored("--upcast_before_saving", "the trained weights (LoRA or the whole transformer) are float32 already "
                                      "and saved so"),
    Unsupported("--enable_npu_flash_attention", "Ascend NPU attention is not supported; drop the flag"),
    LOCAL_RANK,
)

# diffusers' examples/text_to_image/train_text_to_image_sdxl.py and train_text_to_image_lora_sdxl.py, for
# train_immiscible_sd.py on an SDXL model (next to TEXT_TO_IMAGE_FLAGS, which they share).
WITHOUT_TIMESTEP_BIAS = "only used with --timestep_bias_strategy other than none, which is not supported"
SDXL_TEXT_TO_IMAGE_FLAGS = (
    Alias("--proportion_empty_prompts", "--caption_dropout"),
    Ignored("--timestep_bias_multiplier", WITHOUT_TIMESTEP_BIAS),
    Ignored("--timestep_bias_begin", WITHOUT_TIMESTEP_BIAS),
    Ignored("--timestep_bias_end", WITHOUT_TIMESTEP_BIAS),
    Ignored("--timestep_bias_portion", WITHOUT_TIMESTEP_BIAS),
    Ignored("--debug_loss", "per-file losses are not logged; the loss and the assignment's statistics are"),
    Unsupported("--train_text_encoder", "the text encoders stay frozen (their embeddings are computed once per "
                                        "prompt); drop the flag to train the UNet's LoRA"),
    Unsupported("--enable_npu_flash_attention", "Ascend NPU attention is not supported; drop the flag"),
)
