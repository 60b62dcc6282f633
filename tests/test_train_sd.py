"""train_immiscible_sd.py end to end, on a tiny SD model and tiny image folders, offline, on the CPU.

Five `accelerate launch` runs, shared by the tests (each costs seconds of imports):
  finetune  fine-tune, linear assignment grouped by label, EMA, checkpoints every 2 steps (keep 3), validation,
            min-SNR, noise offset, input perturbation, caption dropout, flips; 8 steps of batch 2 (12 images: the
            second epoch starts at step 7)
  cached    the same from --cache_latents                       -> the same training as from the images
  resumed   the finetune run resumed from its checkpoint-4 (mid-epoch) -> bit-identical to the finetune run
  scratch   from scratch, KNN, v-prediction, gradient accumulation, text captions (lists), random crops,
            a subset of the rows, scaled learning rate, gradient checkpointing
  global    2 processes (gloo), global linear assignment grouped by label, cache built by both processes
and one plain `python` process that runs the script's argument and data errors in turn.
"""

import importlib.util
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from launching import interrupt_after_first_step, launch_command, launch_environment, run_launched
from sd_fixtures import captioned_folder, labelled_folder, one_thread, scalars, tiny_sd  # noqa: F401 - fixtures

from immiscible_pipeline import TrainingCoupling

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "train_immiscible_sd.py"
WEIGHTS = "diffusion_pytorch_model.safetensors"
def launch(output_dir: Path, flags: list, processes: int = 1) -> Path:
    """Runs the script with `accelerate launch`; returns output_dir (the log is output_dir.log)."""
    proc = run_launched(launch_command(processes, SCRIPT, "--output_dir", output_dir, *flags),
                        env=launch_environment(), timeout=420)
    Path(f"{output_dir}.log").write_text(proc.stdout)
    assert proc.returncode == 0, f"training failed:\n{proc.stdout[-6000:]}"
    return output_dir


def finetune_flags(tiny_sd, data):
    return ["--pretrained_model_name_or_path", tiny_sd, "--train_data_dir", data, "--caption_column", "label",
            "--train_batch_size", 2, "--max_train_steps", 8, "--learning_rate", 1e-3, "--lr_warmup_steps", 0,
            "--seed", 0, "--immiscible", "linear", "--immiscible_groups", "label", "--use_ema",
            "--checkpointing_steps", 2, "--checkpoints_total_limit", 3, "--validation_prompts", "a photo of a tench",
            "a photo of a goldfish", "--validation_steps", 3, "--validation_inference_steps", 2, "--center_crop",
            "--random_flip", "--caption_dropout", 0.2, "--snr_gamma", 5, "--noise_offset", 0.05,
            "--input_perturbation", 0.1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("sd_runs")


@pytest.fixture(scope="module")
def finetune(runs, tiny_sd, labelled_folder):
    return launch(runs / "finetune", finetune_flags(tiny_sd, labelled_folder))


@pytest.fixture(scope="module")
def cached(runs, tiny_sd, labelled_folder):
    return launch(runs / "cached", finetune_flags(tiny_sd, labelled_folder) + ["--cache_latents", runs / "cache"])


@pytest.fixture(scope="module")
def resumed(runs, finetune, tiny_sd, labelled_folder):
    output = runs / "resumed"
    output.mkdir()
    shutil.copytree(finetune / "checkpoint-4", output / "checkpoint-4")
    return launch(output, finetune_flags(tiny_sd, labelled_folder) + ["--resume_from_checkpoint", "latest"])


@pytest.fixture(scope="module")
def scratch(runs, tiny_sd, captioned_folder):
    return launch(runs / "scratch", [
        "--pretrained_model_name_or_path", tiny_sd, "--train_data_dir", captioned_folder, "--caption_column", "text",
        "--from_scratch", "--resolution", 16, "--immiscible", "knn", "--immiscible_k", 4,
        "--prediction_type", "v_prediction", "--gradient_accumulation_steps", 2, "--train_batch_size", 2,
        "--max_train_steps", 3, "--lr_warmup_steps", 0, "--seed", 1, "--caption_dropout", 0.1,
        "--image_interpolation_mode", "bicubic", "--validation_prompts", "a red shape number 3",
        "--validation_inference_steps", 2, "--max_train_samples", 6, "--scale_lr", "--learning_rate", 1e-4,
        "--gradient_checkpointing"])


@pytest.fixture(scope="module")
def two_processes(runs, tiny_sd, labelled_folder):
    return launch(runs / "global", [
        "--pretrained_model_name_or_path", tiny_sd, "--train_data_dir", labelled_folder, "--train_batch_size", 3,
        "--max_train_steps", 2, "--lr_warmup_steps", 0, "--seed", 0, "--immiscible", "linear",
        "--assignment_scope", "global", "--immiscible_groups", "label", "--center_crop", "--random_flip",
        "--cache_latents", runs / "cache_global", "--cache_latents_chunk_size", 3], processes=2)


def unet_weights(folder: Path) -> dict:
    return load_file(folder / WEIGHTS)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[key].float() - b[key].float()).abs().max().item() for key in a)


def generate(output_dir: Path, prompt: str):
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(output_dir)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    return pipeline, image


# --- fine-tuning ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_finetuned_pipeline_loads_and_generates_from_a_prompt(finetune, tiny_sd):
    pipeline, image = generate(finetune, "a photo of a tench")
    assert type(pipeline).__name__ == "StableDiffusionPipeline"
    assert pipeline.safety_checker is None and not pipeline.config.requires_safety_checker
    assert isinstance(image, Image.Image) and image.size == (16, 16)
    pretrained = Path(tiny_sd)
    assert max_difference(unet_weights(finetune / "unet"), unet_weights(pretrained / "unet")) > 1e-4  # trained
    assert max_difference(unet_weights(finetune / "vae"), unet_weights(pretrained / "vae")) == 0  # frozen
    config = json.loads((finetune / "training_config.json").read_text())
    assert config["global_step"] == 8 and config["num_processes"] == 1
    assert config["class_names"] == ["goldfish, Carassius auratus", "tench, Tinca tinca"]
    assert (finetune / "samples.png").is_file() and (finetune / "samples" / "step-000003.png").is_file()


@pytest.mark.slow
def test_checkpoint_rotation_and_ema(finetune):
    assert sorted(path.name for path in finetune.glob("checkpoint-*")) == [
        "checkpoint-4", "checkpoint-6", "checkpoint-8"]  # checkpoint-2 rotated out
    last = finetune / "checkpoint-8"
    saved = unet_weights(finetune / "unet")
    assert max_difference(saved, unet_weights(last / "unet_ema")) == 0  # the pipeline holds the EMA weights
    assert max_difference(saved, unet_weights(last / "unet")) > 1e-5  # which are not the raw weights
    assert json.loads((last / "unet_ema" / "ema_state.json").read_text())["optimization_step"] == 8


@pytest.mark.slow
def test_assignment_grouped_by_label_is_logged_every_step(finetune):
    logged = scalars(finetune)
    assert len(logged["loss"]) == 8 and all(torch.isfinite(torch.tensor(logged["loss"])))
    assert logged["immiscible/batch_size"] == [2.0] * 8
    # Grouped by label, a batch of two classes (or a dropped prompt) cannot be re-paired: a no-op that an
    # ungrouped batch of 2 never is; a batch of one class is assigned (swapped or not).
    noop, reductions = logged["immiscible/noop"], logged["immiscible/relative_reduction"]
    assert 0 < sum(noop) < 8
    assert all(r == 0 for r, n in zip(reductions, noop) if n) and min(reductions) >= 0
    assert "ema_decay" in logged
    # What re-noising samplers should keep: linear within 2 classes of a batch of 2, groups of about one
    coupling = TrainingCoupling.load(str(finetune))
    assert (coupling.method, coupling.group_size, coupling.per_class) == ("linear", 1, True)


@pytest.mark.slow
def test_resume_from_checkpoint_is_exact(finetune, resumed):
    assert "Resuming from checkpoint" in Path(f"{resumed}.log").read_text()
    assert max_difference(unet_weights(resumed / "unet"), unet_weights(finetune / "unet")) == 0
    last = "checkpoint-8/unet"
    assert max_difference(unet_weights(resumed / last), unet_weights(finetune / last)) == 0
    assert len(scalars(resumed)["loss"]) == 4  # steps 5 to 8 only: the 4 batches seen were skipped


@pytest.mark.slow
def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint(tmp_path, tiny_sd, labelled_folder):
    flags = finetune_flags(tiny_sd, labelled_folder) + ["--max_train_steps", 100000, "--checkpointing_steps", 100000,
                                                         "--validation_steps", 100000]
    command = launch_command(1, SCRIPT, "--output_dir", tmp_path, *flags)
    result = interrupt_after_first_step(command, timeout=300, signum=signal.SIGTERM, env=launch_environment())
    assert "SIGTERM received" in result.stdout and result.returncode != 0, result.stdout[-4000:]
    (saved,) = tmp_path.glob("checkpoint-*")
    assert f"Interrupted at step {saved.name.removeprefix('checkpoint-')}:" in result.stdout
    assert {"unet", "unet_ema", "optimizer.bin"} <= {path.name for path in saved.iterdir()}
    assert not (tmp_path / "model_index.json").exists()


@pytest.mark.slow
def test_cached_latents_train_like_the_images(finetune, cached, runs, tiny_sd):
    """Same seed: the cache gives the same batches (checked exactly in test_latent_cache.py), so the run ends
    at the same weights, up to the float rounding of encoding images in other batches."""
    trained, from_cache = unet_weights(finetune / "unet"), unet_weights(cached / "unet")
    change = max_difference(trained, unet_weights(Path(tiny_sd) / "unet"))
    assert max_difference(trained, from_cache) < 0.05 * change
    assert torch.allclose(torch.tensor(scalars(cached)["loss"]), torch.tensor(scalars(finetune)["loss"]), rtol=1e-3)
    meta = json.loads((runs / "cache" / "meta.json").read_text())
    assert meta["num_rows"] == 12 and meta["flip"] and meta["settings"]["resolution"] == 16
    assert (runs / "cache" / "chunk-000000.pt").is_file()


# --- from scratch, KNN, v-prediction, captions ---------------------------------------------------------------

@pytest.mark.slow
def test_from_scratch_knn_v_prediction_with_text_captions(scratch, tiny_sd):
    pipeline, image = generate(scratch, "a red shape number 3")
    assert image.size == (16, 16)
    assert pipeline.scheduler.config.prediction_type == "v_prediction"  # sampling uses the trained objective
    assert type(pipeline.scheduler).__name__ == "PNDMScheduler"  # the pretrained model's sampler
    pretrained = unet_weights(Path(tiny_sd) / "unet")
    # Random initialisation, not the pretrained weights plus 3 small steps.
    assert max_difference(unet_weights(scratch / "unet"), pretrained) > 0.05
    logged = scalars(scratch)
    assert len(logged["loss"]) == 3  # optimisation steps, each over 2 micro-batches
    assert all(value > 0 for value in logged["immiscible/relative_reduction"])  # KNN always moves closer
    assert logged["lr"] == pytest.approx([1e-4 * 2 * 2] * 3)  # --scale_lr: x batch 2 x accumulation 2 x 1 process
    config = json.loads((scratch / "training_config.json").read_text())
    assert config["class_names"] is None and config["num_images"] == 6  # --max_train_samples


# --- two processes ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_with_global_assignment(two_processes, runs):
    config = json.loads((two_processes / "training_config.json").read_text())
    assert config["num_processes"] == 2  # really two processes, not two unsynchronised single ones
    logged = scalars(two_processes)
    assert logged["immiscible/num_processes"] == [2.0, 2.0]
    assert logged["immiscible/batch_size"] == [6.0, 6.0]  # the global batch: 2 processes x 3
    assert min(logged["immiscible/relative_reduction"]) > 0  # within each class of the global batch
    cache = runs / "cache_global"
    encoders = {torch.load(chunk, weights_only=True)["encoded_by"] for chunk in cache.glob("chunk-*.pt")}
    assert len(list(cache.glob("chunk-*.pt"))) == 4 and encoders == {0, 1}  # both processes encoded
    _, image = generate(two_processes, "a photo of a goldfish")
    assert image.size == (16, 16)


# --- clear errors -------------------------------------------------------------------------------------------

ERRORS_DRIVER = """
import json, sys
from train_immiscible_sd import main, parse_args
cases, results = json.loads(sys.argv[1]), {}
for name, argv in cases.items():
    try:
        main(parse_args(argv))
        results[name] = None
    except ValueError as error:
        results[name] = str(error)
print("RESULTS" + json.dumps(results))
"""


@pytest.mark.slow
def test_clear_errors(tmp_path, tiny_sd, labelled_folder, captioned_folder):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(labelled_folder, corrupt)
    broken = corrupt / "tench, Tinca tinca" / "broken.png"
    good = next((corrupt / "tench, Tinca tinca").glob("*.png")).read_bytes()
    broken.write_bytes(good[: len(good) // 2])  # a valid header, truncated pixel data
    base = ["--output_dir", str(tmp_path / "out"), "--report_to", "none", "--train_batch_size", "4",
            "--max_train_steps", "4", "--checkpointing_steps", "100"]
    model = ["--pretrained_model_name_or_path", tiny_sd]
    cases = {
        "no_model": ["--pretrained_model_name_or_path", str(tmp_path / "no-such-model"),
                     "--train_data_dir", str(labelled_folder)] + base,
        "not_a_model": ["--pretrained_model_name_or_path", str(labelled_folder),
                        "--train_data_dir", str(labelled_folder)] + base,
        "missing_column": model + ["--train_data_dir", str(labelled_folder), "--caption_column", "caption"] + base,
        "no_class_names": model + ["--train_data_dir", str(captioned_folder), "--caption_column", "class_id"] + base,
        "corrupt_image": model + ["--train_data_dir", str(corrupt)] + base,
        "xformers": model + ["--train_data_dir", str(labelled_folder),
                             "--enable_xformers_memory_efficient_attention"] + base,
        "bitsandbytes": model + ["--train_data_dir", str(labelled_folder), "--use_8bit_adam"] + base,
        "negative_snr_gamma": model + ["--train_data_dir", str(labelled_folder), "--snr_gamma", "-5"] + base,
        "cache_needs_center_crop": model + ["--train_data_dir", str(labelled_folder), "--cache_latents",
                                            str(tmp_path / "cache")] + base,
    }
    proc = subprocess.run([sys.executable, "-c", ERRORS_DRIVER, json.dumps(cases)], env=launch_environment(), cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.split("RESULTS")[-1])
    assert "no-such-model: no such folder" in results["no_model"]
    assert "not a Stable Diffusion model: it has no unet, vae, text_encoder, tokenizer, scheduler" in \
        results["not_a_model"]
    assert "--caption_column 'caption' is not a column of the dataset; its columns are: image, label" in \
        results["missing_column"]
    assert "'class_id' holds integer labels without class names" in results["no_class_names"]
    assert f"cannot read the image {broken}" in results["corrupt_image"]
    if importlib.util.find_spec("xformers") is None:  # an optional package
        assert "xformers" in results["xformers"] and "not installed" in results["xformers"]
    assert "add --center_crop" in results["cache_needs_center_crop"]
    assert "--snr_gamma must be positive, or 0 for no min-SNR weighting; got -5.0" in results["negative_snr_gamma"]
    if importlib.util.find_spec("bitsandbytes") is None:  # not a dependency of this project
        assert "--use_8bit_adam needs bitsandbytes" in results["bitsandbytes"]


# --- the script's library pieces (in process) -----------------------------------------------------------------

def test_resize_filter_is_used_and_the_rest_is_data_image_transform():
    from immiscible_pipeline.data import ImageTransform
    from immiscible_pipeline.training.stable_diffusion import FilteredImageTransform

    pixels = torch.Generator().manual_seed(0)
    image = Image.fromarray((torch.rand(40, 60, 3, generator=pixels) * 255).to(torch.uint8).numpy())
    nearest = FilteredImageTransform(16, center_crop=True, interpolation="nearest")(image)
    lanczos = FilteredImageTransform(16, center_crop=True, interpolation="lanczos")(image)
    assert nearest.shape == lanczos.shape == (3, 16, 16) and not torch.allclose(nearest, lanczos)
    expected = ImageTransform(16, center_crop=True)(image.resize((24, 16), Image.NEAREST))
    torch.testing.assert_close(nearest, expected)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        FilteredImageTransform(16, interpolation="cubic")


def test_pretrained_model_checks(tmp_path, tiny_sd):
    from immiscible_pipeline.training.stable_diffusion import check_pretrained_model

    check_pretrained_model(tiny_sd)  # a complete folder passes
    with pytest.raises(ValueError, match="no such folder"):
        check_pretrained_model(str(tmp_path / "missing"))
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    with pytest.raises(ValueError, match="it has no vae, text_encoder, tokenizer, scheduler sub-folder"):
        check_pretrained_model(str(tmp_path / "partial"))
    with pytest.raises(ValueError, match="not a local folder, and the Hub repo could not be read"):
        check_pretrained_model("no-such-org/no-such-model")  # offline in the tests: fails at once
