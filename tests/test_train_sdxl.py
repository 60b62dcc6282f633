"""train_immiscible_sd.py on a tiny SDXL pipeline built from configs (offline): a 2-process launched run with the
global assignment, and in this process a LoRA that StableDiffusionXLPipeline.load_lora_weights takes and that
resumes exactly, diffusers' SDXL LoRA test commands, whole-UNet fine-tuning into a stock StableDiffusionXLPipeline
with another VAE, the UNet's SDXL conditioning next to the assigned noise, and the flags of diffusers'
train_text_to_image_sdxl.py / train_text_to_image_lora_sdxl.py."""

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from sd_fixtures import captioned_folder, one_thread, scalars  # noqa: F401 - fixtures
from trainer_runs import launch, load_script, refused_flags, run_with_warnings as run, summary

from immiscible_pipeline.training.diffusers_example_flags import (Alias, SDXL_TEXT_TO_IMAGE_FLAGS, TEXT_TO_IMAGE_FLAGS,
                                                                  Unsupported)
from immiscible_pipeline.training.lora import LORA_WEIGHTS_NAME
from immiscible_pipeline.training.sample_grids import image_grid
from immiscible_pipeline.training.tiny_stable_diffusion import build_tiny_sdxl

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent
PROMPT = "a photo of sks shape"


@pytest.fixture(scope="module")
def trainer():
    return load_script(REPO / "train_immiscible_sd.py")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "model")


def command(model, data, output_dir, max_train_steps, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--instance_prompt", PROMPT,
            "--resolution", 16, "--train_batch_size", 2, "--max_train_steps", max_train_steps, "--learning_rate",
            "1e-3", "--lr_warmup_steps", 0, "--seed", 0, "--checkpointing_steps", 2, "--immiscible", "knn",
            "--immiscible_k", 4, "--output_dir", output_dir, *extra]


def generate(pipeline, **kwargs):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kwargs).images


def test_sdxl_lora_loads_in_plain_diffusers_and_resumes_exactly(trainer, tiny_sdxl, tiny_imagefolder, tmp_path):
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    validation = ["--validation_prompt", PROMPT, "--num_validation_images", 1, "--validation_inference_steps", 2,
                  "--validation_steps", 3]
    run(trainer, command(tiny_sdxl, tiny_imagefolder, first, 4, "--rank", 4, *validation))
    resumed.mkdir()
    shutil.copytree(first / "checkpoint-2", resumed / "checkpoint-2")
    run(trainer, command(tiny_sdxl, tiny_imagefolder, resumed, 4, "--rank", 4, "--resume_from_checkpoint",
                         "latest"))
    final, again = load_file(first / LORA_WEIGHTS_NAME), load_file(resumed / LORA_WEIGHTS_NAME)
    assert final and all(key.startswith("unet.") for key in final)
    assert final.keys() == again.keys() and all(torch.equal(final[key], again[key]) for key in final)
    assert (first / "samples" / "step-000003.png").is_file() and not (first / "model_index.json").exists()
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    base = generate(pipeline, output_type="np")
    pipeline.load_lora_weights(first)
    assert abs(generate(pipeline, output_type="np") - base).max() > 1e-3
    # The final validation grid is what a user gets: the base SDXL pipeline with the saved file loaded.
    images = generate(pipeline, guidance_scale=7.5)  # the script's --validation_guidance_scale
    assert Image.open(first / "samples.png").tobytes() == image_grid(images).tobytes()


@pytest.mark.slow
def test_sdxl_on_two_processes_assigns_the_global_batch(tiny_sdxl, tiny_imagefolder, tmp_path):
    launch(REPO / "train_immiscible_sd.py", command(tiny_sdxl, tiny_imagefolder, tmp_path, 2, "--rank", 4,
                                                    "--train_batch_size", 1, "--immiscible", "linear",
                                                    "--assignment_scope", "global"), processes=2)
    assert summary(tmp_path)["num_processes"] == 2  # really two processes, not two unsynchronised single ones
    logged = scalars(tmp_path)
    assert logged["immiscible/batch_size"] == [2.0, 2.0] and logged["immiscible/num_processes"] == [2.0, 2.0]
    assert (tmp_path / LORA_WEIGHTS_NAME).is_file()


def test_sdxl_whole_unet_fine_tune_saves_a_stock_pipeline_with_the_vae_asked_for(trainer, tiny_sdxl,
                                                                                   tiny_imagefolder, tmp_path):
    other_vae = tmp_path / "vae"
    vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    torch.nn.init.normal_(vae.decoder.conv_out.weight)  # another decoder: a different VAE
    vae.save_pretrained(other_vae)
    run(trainer, command(tiny_sdxl, tiny_imagefolder, tmp_path / "out", 2, "--pretrained_vae_model_name_or_path",
                         other_vae, "--proportion_empty_prompts", 0.5))
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "out")
    assert isinstance(pipeline, StableDiffusionXLPipeline)
    assert torch.equal(pipeline.vae.decoder.conv_out.weight, vae.decoder.conv_out.weight)
    assert summary(tmp_path / "out")["caption_dropout"] == 0.5  # diffusers' --proportion_empty_prompts
    assert generate(pipeline, output_type="np").shape == (1, 16, 16, 3)


def test_the_sdxl_unet_gets_its_conditioning_next_to_the_assigned_noise(trainer, tiny_sdxl, tiny_imagefolder,
                                                                       tmp_path, monkeypatch):
    seen = []
    real_load = trainer.UNet2DConditionModel.from_pretrained

    def load(*args, **kwargs):
        unet = real_load(*args, **kwargs)
        unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
        return unet

    monkeypatch.setattr(trainer.UNet2DConditionModel, "from_pretrained", load)
    run(trainer, command(tiny_sdxl, tiny_imagefolder, tmp_path, 1, "--rank", 4))
    (args, kwargs), = seen
    added = kwargs["added_cond_kwargs"]
    assert args[2].shape == (2, 32, 32)  # both encoders' 16-wide states, concatenated
    assert added["text_embeds"].shape == (2, 16)  # the second encoder's pooled projection
    assert added["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2  # size ids: what the pipeline samples with
    assert scalars(tmp_path)["immiscible/relative_reduction"][0] > 0  # KNN re-paired the noise


def test_diffusers_sdxl_lora_test_commands_run_with_rank_4(trainer, tiny_sdxl, captioned_folder, tmp_path):
    """diffusers' test_text_to_image_lora.py SDXL commands, flags verbatim but for the data (a local folder with
    a `text` column instead of hf-internal-testing/dummy_image_text_data) and --rank 4 (this script fine-tunes
    the whole UNet without it); the text-encoder variants are refused (--train_text_encoder)."""
    def diffusers_command(output_dir, max_train_steps, *extra):
        return ["--pretrained_model_name_or_path", tiny_sdxl, "--train_data_dir", captioned_folder, "--resolution",
                64, "--train_batch_size", 1, "--gradient_accumulation_steps", 1, "--max_train_steps", max_train_steps,
                "--learning_rate", "5.0e-04", "--scale_lr", "--lr_scheduler", "constant", "--lr_warmup_steps", 0,
                "--output_dir", output_dir, *extra, "--rank", 4]

    run(trainer, diffusers_command(tmp_path / "plain", 2))
    assert all("lora" in key for key in load_file(tmp_path / "plain" / LORA_WEIGHTS_NAME))
    run(trainer, diffusers_command(tmp_path / "limit", 7, "--checkpointing_steps=2", "--checkpoints_total_limit=2"))
    assert {path.name for path in (tmp_path / "limit").glob("checkpoint-*")} == {"checkpoint-4", "checkpoint-6"}
    pipeline = DiffusionPipeline.from_pretrained(tiny_sdxl)
    base = generate(pipeline, output_type="np")
    pipeline.load_lora_weights(tmp_path / "limit")
    assert abs(generate(pipeline, output_type="np") - base).max() > 1e-3
    with pytest.raises(ValueError, match="--train_text_encoder .* is not supported"):
        trainer.parse_args([str(arg) for arg in diffusers_command(tmp_path / "te", 2, "--train_text_encoder")])


SWITCH = None
# Every flag of train_text_to_image_sdxl.py and what train_text_to_image_lora_sdxl.py adds.
TRAIN_TEXT_TO_IMAGE_SDXL = {
    "--pretrained_model_name_or_path": "MODEL", "--pretrained_vae_model_name_or_path": "vae", "--revision": "main",
    "--variant": "fp16", "--dataset_name": "me/data", "--dataset_config_name": "plain", "--train_data_dir": "DIR",
    "--image_column": "image", "--caption_column": "text", "--validation_prompt": "a prompt",
    "--num_validation_images": "4", "--validation_epochs": "1", "--max_train_samples": "10",
    "--proportion_empty_prompts": "0.1", "--output_dir": "out", "--cache_dir": "cache", "--seed": "0",
    "--resolution": "1024", "--center_crop": SWITCH, "--random_flip": SWITCH, "--train_batch_size": "16",
    "--num_train_epochs": "100", "--max_train_steps": "10", "--checkpointing_steps": "500",
    "--checkpoints_total_limit": "2", "--resume_from_checkpoint": "latest", "--gradient_accumulation_steps": "1",
    "--gradient_checkpointing": SWITCH, "--learning_rate": "1e-4", "--scale_lr": SWITCH, "--lr_scheduler": "constant",
    "--lr_warmup_steps": "500", "--timestep_bias_strategy": "none", "--timestep_bias_multiplier": "1.0",
    "--timestep_bias_begin": "0", "--timestep_bias_end": "1000", "--timestep_bias_portion": "0.25",
    "--snr_gamma": "5.0", "--use_ema": SWITCH, "--allow_tf32": SWITCH, "--dataloader_num_workers": "0",
    "--use_8bit_adam": SWITCH, "--adam_beta1": "0.9", "--adam_beta2": "0.999", "--adam_weight_decay": "1e-2",
    "--adam_epsilon": "1e-08", "--max_grad_norm": "1.0", "--push_to_hub": SWITCH, "--hub_token": "tok",
    "--prediction_type": "epsilon", "--hub_model_id": "me/model", "--logging_dir": "logs",
    "--report_to": "tensorboard", "--mixed_precision": "bf16", "--local_rank": "0",
    "--enable_xformers_memory_efficient_attention": SWITCH, "--enable_npu_flash_attention": SWITCH,
    "--noise_offset": "0.05", "--image_interpolation_mode": "lanczos", "--rank": "4", "--train_text_encoder": SWITCH,
    "--debug_loss": SWITCH,
}


def test_every_sdxl_script_flag_is_accepted_or_refused_by_name(trainer, tiny_sdxl, tmp_path):
    flags = {flag: {"DIR": tmp_path, "MODEL": tiny_sdxl}.get(value, value)
             for flag, value in TRAIN_TEXT_TO_IMAGE_SDXL.items()}
    refused = refused_flags(trainer, flags, lambda flag: ["--pretrained_model_name_or_path", tiny_sdxl])
    unsupported = {entry.flag for entry in (*TEXT_TO_IMAGE_FLAGS, *SDXL_TEXT_TO_IMAGE_FLAGS)
                   if isinstance(entry, Unsupported)}
    assert refused - {"--use_8bit_adam", "--enable_xformers_memory_efficient_attention"} == (
        unsupported & set(TRAIN_TEXT_TO_IMAGE_SDXL))
    with pytest.raises(ValueError, match="--timestep_bias_strategy earlier is not supported"):
        trainer.parse_args(["--pretrained_model_name_or_path", tiny_sdxl, "--timestep_bias_strategy", "earlier"])


def test_the_sd_page_lists_every_sdxl_alias_and_refused_flag():
    page = (REPO / "docs" / "train-sd.md").read_text()
    for entry in SDXL_TEXT_TO_IMAGE_FLAGS:
        if isinstance(entry, (Alias, Unsupported)):
            assert f"`{entry.flag}`" in page, entry.flag
