"""train_immiscible_sd.py with diffusers' own example-test command lines, and LoRA fine-tuning; plus every flag
of diffusers' three example scripts on our two trainers.

Runs in this process (no `accelerate launch`: seconds each), on the tiny SD and tiny image folders:
  text_to_image  diffusers' test_text_to_image.py checkpointing commands, flags verbatim (batch 1, default
                 linear assignment, default caption column), 9 steps then resumed from checkpoint-8 to 11
  lora           diffusers' test_text_to_image_lora.py commands plus --rank 4, an instance prompt, KNN k=4 at
                 batch 1 and a (faked) Hub upload: 4 steps; the same resumed from a copy of its checkpoint-2 with
                 validation images; and resumed from checkpoint-4 to 8 under --checkpoints_total_limit=2
"""

import logging
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

from sd_fixtures import captioned_folder, labelled_folder, one_thread, scalars, tiny_sd  # noqa: F401 - fixtures
from trainer_runs import load_script, run_in_process

import immiscible_pipeline.training.hub_publishing as hub
from immiscible_pipeline.training.diffusers_example_flags import (TEXT_TO_IMAGE_FLAGS, UNCONDITIONAL_FLAGS, Alias,
                                                                  EveryEpochs, steps_from_epoch_flags, Unsupported)
from immiscible_pipeline.training.lora import LORA_WEIGHTS_NAME
from immiscible_pipeline.training.sample_grids import image_grid

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent
BATCH_WARNING = "the assignment does nothing"
INSTANCE_PROMPT = "a photo of sks fish"


@pytest.fixture(scope="module")
def script():
    return load_script(REPO / "train_immiscible_sd.py")


def run(script, argv) -> str:
    """Runs the script in this process; returns the warnings it logged."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        run_in_process(script, [str(arg) for arg in argv])
    finally:
        logging.getLogger().removeHandler(handler)
    return "\n".join(records)


def checkpoints(output_dir) -> set:
    return {path.name for path in Path(output_dir).iterdir() if "checkpoint" in path.name}


def generate(pipeline, prompt="a prompt", **kwargs):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
                    **kwargs).images


# --- diffusers' test_text_to_image.py ------------------------------------------------------------------------

def test_text_to_image_test_commands_run_unchanged(script, tmp_path, tiny_sd, captioned_folder):
    def command(max_train_steps, *extra):
        return ["--pretrained_model_name_or_path", tiny_sd, "--train_data_dir", captioned_folder, "--resolution", 16,
                "--center_crop", "--random_flip", "--train_batch_size", 1, "--gradient_accumulation_steps", 1,
                "--max_train_steps", max_train_steps, "--learning_rate", "5.0e-04", "--scale_lr", "--lr_scheduler",
                "constant", "--lr_warmup_steps", 0, "--output_dir", tmp_path, "--checkpointing_steps=2", *extra,
                "--seed=0"]

    warnings = run(script, command(9))
    assert checkpoints(tmp_path) == {"checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"}
    assert BATCH_WARNING in warnings and "--immiscible knn" in warnings  # the default, linear, at batch 1
    config = (tmp_path / "training_config.json").read_text()
    assert '"caption_column": "text"' in config  # diffusers' default column, without --caption_column
    # An intermediate checkpoint's UNet in the base pipeline, as diffusers' test loads it.
    unet = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="checkpoint-2/unet")
    with_checkpoint = generate(StableDiffusionPipeline.from_pretrained(tiny_sd, unet=unet))
    base = generate(StableDiffusionPipeline.from_pretrained(tiny_sd))
    assert with_checkpoint.shape == (1, 16, 16, 3) and abs(with_checkpoint - base).max() > 0

    run(script, command(11, "--resume_from_checkpoint=checkpoint-8", "--checkpoints_total_limit=3"))
    assert checkpoints(tmp_path) == {"checkpoint-6", "checkpoint-8", "checkpoint-10"}  # 2 and 4 removed at once
    assert len(scalars(tmp_path)["loss"]) == 3  # the resumed run's log: it trained steps 9 to 11 only
    assert generate(StableDiffusionPipeline.from_pretrained(tmp_path)).shape == (1, 16, 16, 3)


# --- LoRA ------------------------------------------------------------------------------------------------------

def lora_command(tiny_sd, data, output_dir, max_train_steps, *extra):
    """diffusers' test_text_to_image_lora.py command (flags verbatim) plus --rank (ours defaults to full
    fine-tuning), one prompt for the folder, and KNN for the batch of 1."""
    return ["--pretrained_model_name_or_path", tiny_sd, "--train_data_dir", data, "--resolution", 16, "--center_crop",
            "--random_flip", "--train_batch_size", 1, "--gradient_accumulation_steps", 1, "--max_train_steps",
            max_train_steps, "--learning_rate", "5.0e-04", "--scale_lr", "--lr_scheduler", "constant",
            "--lr_warmup_steps", 0, "--output_dir", output_dir, "--checkpointing_steps=2", "--seed=0",
            "--num_validation_images=0", "--rank", 4, "--instance_prompt", INSTANCE_PROMPT, "--immiscible", "knn",
            "--immiscible_k", 4, *extra]


@pytest.fixture(scope="module")
def lora(script, tmp_path_factory, tiny_sd, labelled_folder):
    root = tmp_path_factory.mktemp("lora")
    first, resumed = root / "first", root / "resumed"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hub, "create_repo", lambda **kwargs: type("Repo", (), {"repo_id": "me/tiny-lora"})())
        patch.setattr(hub, "upload_folder", lambda **kwargs: None)
        warnings = run(script, lora_command(tiny_sd, labelled_folder, first, 4, "--push_to_hub", "--hub_model_id",
                                            "tiny-lora"))
    final = {name: tensor.clone() for name, tensor in load_file(first / LORA_WEIGHTS_NAME).items()}
    checkpoint_files = {name: sorted(path.name for path in (first / name).iterdir()) for name in checkpoints(first)}
    resumed.mkdir()
    shutil.copytree(first / "checkpoint-2", resumed / "checkpoint-2")
    run(script, lora_command(tiny_sd, labelled_folder, resumed, 4, "--resume_from_checkpoint", "latest",
                             "--validation_prompt", INSTANCE_PROMPT, "--num_validation_images", 2,
                             "--validation_steps", 3, "--validation_inference_steps", 2))
    card = (first / "README.md").read_text()
    run(script, lora_command(tiny_sd, labelled_folder, first, 8, "--resume_from_checkpoint=checkpoint-4",
                             "--checkpoints_total_limit=2"))
    return {"first": first, "resumed": resumed, "final": final, "warnings": warnings, "card": card,
            "checkpoint_files": checkpoint_files}


def test_lora_weights_load_in_plain_diffusers_and_change_the_output(lora, tiny_sd):
    first = lora["first"]
    assert not (first / "model_index.json").exists() and not (first / "unet").exists()  # LoRA weights only
    assert lora["final"] and all(key.startswith("unet.") and ".lora" in key for key in lora["final"])
    assert lora["checkpoint_files"] == {  # diffusers' LoRA checkpoint layout and the run's seed; no frozen base
        name: ["optimizer.bin", LORA_WEIGHTS_NAME, "random_states_0.pkl", "run_seed.json", "scheduler.bin"]
        for name in ("checkpoint-2", "checkpoint-4")}
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
    base = generate(pipeline, INSTANCE_PROMPT)
    pipeline.load_lora_weights(first)
    assert abs(generate(pipeline, INSTANCE_PROMPT) - base).max() > 1e-3


def test_lora_resumes_exactly_and_validates_with_the_base_pipeline_and_the_lora(lora, tiny_sd):
    resumed = load_file(lora["resumed"] / LORA_WEIGHTS_NAME)
    assert resumed.keys() == lora["final"].keys()
    assert all(torch.equal(resumed[key], lora["final"][key]) for key in resumed)  # bit-identical, with validation
    assert len(scalars(lora["resumed"])["loss"]) == 2  # steps 3 and 4
    assert (lora["resumed"] / "samples" / "step-000003.png").is_file()
    # The final images are what a user gets: the pretrained pipeline with the saved file loaded.
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipeline.load_lora_weights(lora["resumed"])
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(INSTANCE_PROMPT, num_inference_steps=2, num_images_per_prompt=2,
                      generator=torch.Generator().manual_seed(0)).images
    assert Image.open(lora["resumed"] / "samples.png").tobytes() == image_grid(images).tobytes()


def test_lora_checkpoint_rotation_after_resuming_from_a_named_checkpoint(lora):
    assert checkpoints(lora["first"]) == {"checkpoint-6", "checkpoint-8"}
    assert len(scalars(lora["first"])["loss"]) == 4  # the resumed run's log: steps 5 to 8


def test_knn_at_batch_one_assigns_every_step_without_the_linear_warning(lora):
    logged = scalars(lora["resumed"])
    assert logged["immiscible/batch_size"] == [1.0, 1.0]
    assert all(value > 0 for value in logged["immiscible/relative_reduction"])  # nearest of 4 noises, every step
    assert BATCH_WARNING not in lora["warnings"]


def test_lora_model_card(lora, tiny_sd):
    card = lora["card"]
    for text in ("- lora", "- immiscible-knn", "- immiscible-diffusion", f"base_model: {tiny_sd}",
                 "| mixed precision | no |", "| learning rate | 0.0005 |",
                 f"Trigger prompt: `{INSTANCE_PROMPT}`", "| UNet | LoRA rank 4 |",
                 f'DiffusionPipeline.from_pretrained("{tiny_sd}")', 'pipeline.load_lora_weights("me/tiny-lora")'):
        assert text in card, text


# --- flags ----------------------------------------------------------------------------------------------------

SWITCH = None
# Every flag of diffusers' scripts (their newest and older versions), with a value for those that take one.
TRAIN_UNCONDITIONAL = {
    "--dataset_name": "cifar10", "--dataset_config_name": "plain", "--model_config_name_or_path": "cfg",
    "--train_data_dir": "DIR", "--output_dir": "out", "--overwrite_output_dir": SWITCH, "--cache_dir": "cache",
    "--resolution": "64", "--center_crop": SWITCH, "--random_flip": SWITCH, "--train_batch_size": "16",
    "--eval_batch_size": "16", "--dataloader_num_workers": "0", "--num_epochs": "100", "--save_images_epochs": "10",
    "--save_model_epochs": "10", "--gradient_accumulation_steps": "1", "--learning_rate": "1e-4",
    "--lr_scheduler": "cosine", "--lr_warmup_steps": "500", "--adam_beta1": "0.95", "--adam_beta2": "0.999",
    "--adam_weight_decay": "1e-6", "--adam_epsilon": "1e-08", "--use_ema": SWITCH, "--ema_inv_gamma": "1.0",
    "--ema_power": "0.75", "--ema_max_decay": "0.9999", "--push_to_hub": SWITCH, "--use_auth_token": SWITCH,
    "--hub_token": "tok", "--hub_model_id": "me/model", "--hub_private_repo": SWITCH, "--logger": "tensorboard",
    "--logging_dir": "logs", "--local_rank": "0", "--mixed_precision": "no", "--prediction_type": "epsilon",
    "--ddpm_num_steps": "1000", "--ddpm_num_inference_steps": "1000", "--ddpm_beta_schedule": "linear",
    "--checkpointing_steps": "500", "--checkpoints_total_limit": "2", "--resume_from_checkpoint": "latest",
    "--enable_xformers_memory_efficient_attention": SWITCH,
}
TRAIN_TEXT_TO_IMAGE = {  # train_text_to_image.py, then what train_text_to_image_lora.py adds
    "--input_perturbation": "0.1", "--pretrained_model_name_or_path": "MODEL", "--revision": "main",
    "--variant": "fp16", "--dataset_name": "me/data", "--dataset_config_name": "plain", "--train_data_dir": "DIR",
    "--image_column": "image", "--caption_column": "text", "--max_train_samples": "10", "--validation_prompts": "a b",
    "--output_dir": "out", "--cache_dir": "cache", "--seed": "0", "--resolution": "512", "--center_crop": SWITCH,
    "--random_flip": SWITCH, "--train_batch_size": "16", "--num_train_epochs": "100", "--max_train_steps": "10",
    "--gradient_accumulation_steps": "1", "--gradient_checkpointing": SWITCH, "--learning_rate": "1e-4",
    "--scale_lr": SWITCH, "--lr_scheduler": "constant", "--lr_warmup_steps": "500", "--snr_gamma": "5.0",
    "--dream_training": SWITCH, "--dream_detail_preservation": "1.0", "--use_8bit_adam": SWITCH,
    "--allow_tf32": SWITCH, "--use_ema": SWITCH, "--offload_ema": SWITCH, "--foreach_ema": SWITCH,
    "--non_ema_revision": "main", "--dataloader_num_workers": "0", "--adam_beta1": "0.9", "--adam_beta2": "0.999",
    "--adam_weight_decay": "1e-2", "--adam_epsilon": "1e-08", "--max_grad_norm": "1.0", "--push_to_hub": SWITCH,
    "--hub_token": "tok", "--prediction_type": "epsilon", "--hub_model_id": "me/model", "--logging_dir": "logs",
    "--mixed_precision": "no", "--report_to": "tensorboard", "--local_rank": "0", "--checkpointing_steps": "500",
    "--checkpoints_total_limit": "2", "--resume_from_checkpoint": "latest",
    "--enable_xformers_memory_efficient_attention": SWITCH, "--noise_offset": "0.05", "--validation_epochs": "1",
    "--tracker_project_name": "t2i", "--image_interpolation_mode": "lanczos",
    "--validation_prompt": "a prompt", "--num_validation_images": "4", "--rank": "4",
}


@pytest.mark.parametrize("script_name, diffusers_flags", [("train_immiscible_ddim.py", TRAIN_UNCONDITIONAL),
                                                          ("train_immiscible_sd.py", TRAIN_TEXT_TO_IMAGE)])
def test_every_diffusers_flag_is_accepted_or_refused_by_name(script_name, diffusers_flags, tmp_path, tiny_sd):
    trainer = load_script(REPO / script_name)
    required = ["--pretrained_model_name_or_path", tiny_sd] if "sd" in script_name else []
    outcomes = {}
    for flag, value in diffusers_flags.items():
        value = {"DIR": str(tmp_path), "MODEL": tiny_sd}.get(value, value)
        argv = required + [flag] + ([] if value is None else value.split())
        try:
            trainer.parse_args(argv)
            outcomes[flag] = "accepted"
        except ValueError as error:
            assert flag in str(error), f"{flag}: the error does not name the flag: {error}"
            outcomes[flag] = "refused"
        except SystemExit:
            pytest.fail(f"{script_name} {' '.join(argv)}: argparse refused it")
    # What is refused is refused on purpose (or for lack of an optional package), never by accident.
    unsupported = {entry.flag for entry in (*UNCONDITIONAL_FLAGS, *TEXT_TO_IMAGE_FLAGS)
                   if isinstance(entry, Unsupported)}
    needs_package = {"--enable_xformers_memory_efficient_attention", "--use_8bit_adam"}
    assert {flag for flag, outcome in outcomes.items() if outcome == "refused"} - needs_package <= unsupported
    assert {flag for flag in diffusers_flags if flag in unsupported} <= {
        flag for flag, outcome in outcomes.items() if outcome == "refused"}


def test_aliases_set_our_flags(tiny_sd):
    ddim = load_script(REPO / "train_immiscible_ddim.py").parse_args(
        ["--ddpm_num_inference_steps", "3", "--eval_batch_size", "5", "--logger", "tensorboard", "--local_rank", "1",
         "--overwrite_output_dir", "--save_images_epochs", "2"])
    assert (ddim.ddim_num_inference_steps, ddim.num_validation_images, ddim.report_to) == (3, 5, "tensorboard")
    assert not hasattr(ddim, "local_rank") and ddim.overwrite_output_dir
    steps_from_epoch_flags(ddim, num_update_steps=7)
    assert ddim.validation_steps == 14
    sd = load_script(REPO / "train_immiscible_sd.py")
    args = sd.parse_args(["--pretrained_model_name_or_path", tiny_sd, "--validation_prompt", "a dog",
                          "--validation_epochs", "3", "--foreach_ema"])
    assert args.validation_prompts == ["a dog"] and args.caption_column is None and args.rank == 0
    assert not hasattr(args, "foreach_ema")  # ours always takes the foreach update
    steps_from_epoch_flags(args, num_update_steps=4)
    assert args.validation_steps == 12
    with pytest.raises(ValueError, match="--validation_epochs must be at least 1"):
        sd.parse_args(["--pretrained_model_name_or_path", tiny_sd, "--validation_epochs", "0"])


@pytest.mark.parametrize("argv, message", [
    (["--rank", "4", "--from_scratch"], "--rank trains a LoRA on top of the pretrained UNet"),
    (["--rank", "4", "--use_ema"], "--use_ema is not supported with --rank"),
    (["--rank", "-1"], "--rank must be at least 0"),
    (["--dream_training"], "--dream_training .* is not supported: DREAM"),
    (["--non_ema_revision", "main"], "pass the revision to fine-tune as --revision"),
])
def test_lora_and_diffusers_flag_errors(argv, message, tiny_sd):
    sd = load_script(REPO / "train_immiscible_sd.py")
    with pytest.raises(ValueError, match=message):
        sd.parse_args(["--pretrained_model_name_or_path", tiny_sd, *argv])


def test_the_sd_page_lists_every_alias_and_refused_flag():
    readme = (REPO / "docs" / "train-sd.md").read_text()
    for entry in (*UNCONDITIONAL_FLAGS, *TEXT_TO_IMAGE_FLAGS):
        if isinstance(entry, (Alias, EveryEpochs, Unsupported)):
            assert f"`{entry.flag}`" in readme, entry.flag


# --- library pieces ---------------------------------------------------------------------------------------------

def test_prompt_column_follows_diffusers_then_class_labels():
    import datasets

    from immiscible_pipeline.training.captions import INSTANCE_COLUMN, prompt_column

    labelled = datasets.Dataset.from_dict({"image": [0, 1], "label": [0, 1]}).cast_column(
        "label", datasets.ClassLabel(names=["cat", "dog"]))
    captioned = labelled.add_column("text", ["a cat", "a dog"])
    assert prompt_column(labelled)[1] == "label"
    assert prompt_column(captioned)[1] == "text"  # text wins over class labels, as in diffusers
    assert prompt_column(captioned, "label")[1] == "label"
    with_prompt, column = prompt_column(captioned, instance_prompt="a photo of sks dog")
    assert column == INSTANCE_COLUMN and with_prompt[column] == ["a photo of sks dog"] * 2
    with pytest.raises(ValueError, match="either --instance_prompt .* or --caption_column"):
        prompt_column(captioned, "text", "a photo of sks dog")
    with pytest.raises(ValueError, match="no 'text' column .* --instance_prompt"):
        prompt_column(datasets.Dataset.from_dict({"image": [0, 1]}))


def test_batch_of_one_warning_only_where_linear_assignment_is_a_no_op():
    from immiscible_pipeline.training.arguments import assignment_batch_warning

    assert BATCH_WARNING in assignment_batch_warning("linear", 1, "local", 2)
    assert BATCH_WARNING in assignment_batch_warning("linear", 1, "global", 1)
    assert assignment_batch_warning("linear", 1, "global", 2) is None  # 2 processes' samples assigned together
    assert assignment_batch_warning("linear", 2, "local", 1) is None
    assert assignment_batch_warning("knn", 1, "local", 1) is None
