"""train_immiscible_cm.py end to end: launched runs (1 and 2 processes) and in-process runs with spies."""

import json
import signal
from pathlib import Path

import pytest
import torch
from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, DiffusionPipeline
from safetensors.torch import load_file

from conftest import skip_if_installed
from trainer_runs import checkpoints, launch, load_script, run_in_process, scalars, spy_on_noise, summary

import immiscible_pipeline.training.hub_publishing as hub
import immiscible_pipeline.training.pixel_run as pixel_run
from immiscible_pipeline import TrainingCoupling
from immiscible_pipeline.training.consistency_training import denoise

PROJECT = "train_immiscible_cm"  # its TensorBoard folder
SCRIPT = Path(__file__).resolve().parents[1] / "train_immiscible_cm.py"


@pytest.fixture(scope="module")
def trainer():
    return load_script(SCRIPT)


@pytest.fixture
def tiny_args(tiny_imagefolder, tiny_unet_config_path, tmp_path):
    """A tiny run: the 12 images of the shared folder at 8 px, batch 4, 4-image sample grids."""
    def make(output_dir, *extra):
        return ["--train_data_dir", str(tiny_imagefolder), "--model_config_name_or_path", str(tiny_unet_config_path),
                "--output_dir", str(output_dir), "--cache_dir", str(tmp_path / "datasets-cache"),
                "--train_batch_size", "4", "--num_validation_images", "4", "--seed", "0", *map(str, extra)]
    return make


# --- launched runs ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_launched_run_saves_a_consistency_pipeline_that_plain_diffusers_samples(tmp_path, tiny_args):
    output = tmp_path / "run"
    launch(SCRIPT, tiny_args(output, "--max_train_steps", 4, "--checkpointing_steps", 2, "--checkpoints_total_limit", 1,
                             "--validation_steps", 3, "--random_flip"))
    assert checkpoints(output) == ["checkpoint-4"]
    assert {"unet", "unet_ema", "optimizer.bin", "random_states_0.pkl"} <= {
        path.name for path in (output / "checkpoint-4").iterdir()}
    assert (output / "samples" / "step-000003.png").is_file()
    pipeline = DiffusionPipeline.from_pretrained(output)
    assert isinstance(pipeline, ConsistencyModelPipeline)
    assert isinstance(pipeline.scheduler, CMStochasticIterativeScheduler)
    assert (pipeline.scheduler.config.sigma_min, pipeline.scheduler.config.sigma_max) == (0.002, 80.0)
    for steps in (1, 2):
        images = pipeline(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).images
        assert [image.size for image in images] == [(8, 8), (8, 8)]
    # samples.png: the 2 x 2 one-step samples above the 2 x 2 two-step samples of the same noise (64 px cells).
    from PIL import Image

    assert Image.open(output / "samples.png").size == (2 * 64, 4 * 64)
    # Fewer steps than curriculum stages: the levels double every step (10 -> 20 -> 40 -> 80).
    assert summary(output)["global_step"] == 4 and summary(output)["final_num_levels"] == 10 * 2**3 + 1
    logged = scalars(output, PROJECT)
    assert logged["immiscible/batch_size"] == 4 and {"loss", "lr", "ema_decay"} <= set(logged)
    assert logged["images"] == ["samples_1_step", "samples_2_step"]


@pytest.mark.slow
def test_two_processes_assign_over_the_global_batch_and_evaluate_one_and_two_step_fid(tmp_path, tiny_args,
                                                                                       monkeypatch):
    output = tmp_path / "run"
    monkeypatch.setenv("IMMISCIBLE_CACHE", str(tmp_path / "eval-cache"))
    launch(SCRIPT, tiny_args(output, "--max_train_steps", 2, "--train_batch_size", 3, "--assignment_scope", "global",
                             "--checkpointing_steps", 100, "--validation_steps", 100, "--eval_steps", 1,
                             "--eval_feature", "inception", "--eval_num_samples", 4, "--eval_num_reference", 6),
           processes=2)
    assert summary(output)["num_processes"] == 2 and summary(output)["total_batch_size"] == 6
    logged = scalars(output, PROJECT)
    assert logged["immiscible/num_processes"] == 2 and logged["immiscible/batch_size"] == 6
    history = [json.loads(line) for line in (output / "eval_history.jsonl").read_text().splitlines()]
    assert [(record["step"], record["num_inference_steps"]) for record in history] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    # The default --immiscible linear over the global batch of 6: evaluations re-noise with that coupling
    assert {record["renoise"] for record in history} == {"matched"}
    coupling = TrainingCoupling.load(str(output))
    assert (coupling.method, coupling.group_size, coupling.scope, coupling.num_processes) == ("linear", 6, "global", 2)
    assert all(record["fid"] > 0 for record in history)
    assert logged["eval/2_step/fid"] == pytest.approx(history[-1]["fid"], rel=1e-5)


# --- in-process runs -------------------------------------------------------------------------------------

def test_ctrl_c_checkpoints_and_the_resumed_run_is_exact_and_samples_like_the_training_denoiser(
        trainer, tmp_path, tiny_args, monkeypatch):
    # 12 images, batch 4, accumulation 2: updates of [b0 b1] [b2] per epoch. Ctrl-C arrives during step 3's
    # first micro-batch; dropout makes the exact resume depend on the RNG being restored too.
    flags = ["--max_train_steps", 5, "--gradient_accumulation_steps", 2, "--checkpointing_steps", 100,
             "--validation_steps", 100, "--dropout", 0.2, "--random_flip", "--lr_warmup_steps", 2,
             "--learning_rate", 1e-3, "--report_to", "none", "--immiscible", "knn"]
    interrupt_on_call = set()
    calls = spy_on_noise(trainer, monkeypatch, interrupt_on_call)
    run_in_process(trainer, tiny_args(tmp_path / "straight", *flags))
    assert len(calls) == 8
    calls.clear()
    interrupt_on_call.add(4)
    previous_handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stopped:
        run_in_process(trainer, tiny_args(tmp_path / "interrupted", *flags))
    assert stopped.value.code == 130 and len(calls) == 5  # step 3 was finished, then nothing more
    assert checkpoints(tmp_path / "interrupted") == ["checkpoint-3"]
    assert not (tmp_path / "interrupted" / "model_index.json").exists()
    assert signal.getsignal(signal.SIGINT) is previous_handler

    calls.clear()
    interrupt_on_call.clear()
    run_in_process(trainer, tiny_args(tmp_path / "interrupted", *flags, "--resume_from_checkpoint", "latest"))
    assert len(calls) == 3
    weights = "unet/diffusion_pytorch_model.safetensors"
    straight, resumed = load_file(tmp_path / "straight" / weights), load_file(tmp_path / "interrupted" / weights)
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)

    # The stock pipeline's one-step sample is the training code's denoiser at sigma_max on the same noise.
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "straight")
    pipeline.set_progress_bar_config(disable=True)
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    images = pipeline(batch_size=3, num_inference_steps=1, latents=noise.clone(), output_type="np").images
    with torch.no_grad():
        trained = denoise(pipeline.unet, noise * 80.0, torch.full((3,), 80.0), pipeline.scheduler).clamp(-1, 1)
    assert torch.allclose(torch.from_numpy(images).permute(0, 3, 1, 2), trained / 2 + 0.5, atol=1e-5)
    assert trained.std() > 0.01  # a trained (non-constant) output, so the comparison means something


def test_class_conditional_run_assigns_within_classes_and_pushes_a_card(trainer, tmp_path, tiny_args, monkeypatch):
    output = tmp_path / "run"
    groups_seen = []
    real_build = pixel_run.build_immiscible

    def recording_build(*args, **kwargs):
        imm = real_build(*args, **kwargs)

        class Recorder:
            last_stats = property(lambda self: imm.last_stats)

            def __call__(self, x0, groups=None):
                groups_seen.append(groups.clone())
                return imm(x0, groups=groups)
        return Recorder()

    monkeypatch.setattr(pixel_run, "build_immiscible", recording_build)
    monkeypatch.setattr(hub, "create_repo", lambda **kwargs: type("Repo", (), {"repo_id": "me/tiny-cm"})())
    uploaded = []
    monkeypatch.setattr(hub, "upload_folder", lambda **kwargs: uploaded.append(kwargs))
    run_in_process(trainer, tiny_args(output, "--max_train_steps", 2, "--class_conditional", "--report_to", "none",
                                      "--loss", "l2", "--push_to_hub", "--hub_token", "tok",
                                      "--gradient_checkpointing", "--center_crop"))
    assert len(groups_seen) == 2 and all(set(groups.tolist()) <= {0, 1} for groups in groups_seen)
    # 8 of the 12 images, 6 per class: both classes are in the groups, which are the labels, not a constant
    assert set(torch.cat(groups_seen).tolist()) == {0, 1}
    pipeline = DiffusionPipeline.from_pretrained(output)
    assert pipeline.unet.config.num_class_embeds == 2 and summary(output)["class_names"] == ["class_0", "class_1"]
    noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    by_class = [pipeline(batch_size=1, num_inference_steps=1, latents=noise.clone(), class_labels=[label],
                         output_type="np").images for label in (0, 1)]
    assert not (by_class[0] == by_class[1]).all()  # the class embedding is used
    card = (output / "README.md").read_text()
    assert "unconditional-image-generation" not in card
    for text in ("- immiscible-diffusion", "- consistency-models", "| class-conditional | True |", "| loss | l2 |",
                 "- class-conditional-image-generation",
                 "| noise levels | 10 -> 1280 |", "num_inference_steps=2, class_labels=[0] * 16",
                 "| multistep sampling | matched re-noising (immiscible_coupling.json) |", "matched_renoise(pipeline)",
                 "num_inference_steps=None, timesteps=[24, 0], class_labels=[0] * 16"):
        assert text in card, text
    # Linear assignment within each of 2 classes in batches of 4: groups of about 2 at training
    assert TrainingCoupling.load(str(output)) == TrainingCoupling(method="linear", group_size=2, per_class=True)
    assert uploaded and uploaded[0]["repo_id"] == "me/tiny-cm"


def test_independent_renoise_is_stock_sampling_and_warns_once(trainer, tmp_path, tiny_args, monkeypatch, caplog):
    grids = []
    real_sample = pixel_run.sample_images
    monkeypatch.setattr(pixel_run, "sample_images", lambda pipeline, **kw: grids.append(
        hasattr(pipeline.scheduler, "coupled_noise")) or real_sample(pipeline, **kw))
    with caplog.at_level("WARNING"):
        run_in_process(trainer, tiny_args(tmp_path / "independent", "--max_train_steps", 1, "--report_to", "none",
                                          "--renoise", "independent"))
    warnings = [r.getMessage() for r in caplog.records if "re-noises between steps" in r.getMessage()]
    assert len(warnings) == 1 and "--renoise matched" in warnings[0]
    assert grids == [False, False]  # samples.png: 1 and 2 steps, stock schedulers
    run_in_process(trainer, tiny_args(tmp_path / "matched", "--max_train_steps", 1, "--report_to", "none"))
    assert grids[2:] == [True, True]


# --- flags and errors ------------------------------------------------------------------------------------

def test_defaults_follow_ict_with_a_dataset_and_fit_a_cpu_without(trainer, tiny_imagefolder):
    # the demo's values are tuned (see the trainer's comment): compared with its table, not with numbers here
    demo_defaults = {k: v for k, v in trainer.RECIPES["mnist-demo"].defaults.items() if k != "unet"}
    demo = trainer.parse_args([])
    assert demo.bundled_demo and demo.use_ema and demo.num_epochs == 100
    assert {k: getattr(demo, k) for k in demo_defaults} == demo_defaults
    epochs = trainer.parse_args(["--num_epochs", "2"])  # the demo's step count would override it
    assert (epochs.num_epochs, epochs.max_train_steps) == (2, None)
    dataset = trainer.parse_args(["--train_data_dir", str(tiny_imagefolder)])
    assert (dataset.dropout, dataset.learning_rate, dataset.max_train_steps) == (0.3, 1e-4, None)
    recipe = dataset.consistency
    assert (recipe.sigma_min, recipe.sigma_max, recipe.sigma_data, recipe.rho) == (0.002, 80.0, 0.5, 7.0)
    assert (recipe.curriculum_start, recipe.curriculum_end, recipe.p_mean, recipe.p_std) == (10, 1280, -1.1, 2.0)
    assert recipe.loss == "pseudo_huber" and dataset.immiscible_k == 4 and dataset.eval_inference_steps == [1, 2]


@pytest.mark.parametrize("argv, message", [
    (["--dropout", "1.0"], r"--dropout must be in \[0, 1\)"),
    (["--sigma_min", "0"], "need 0 < --sigma_min < --sigma_max"),
    (["--curriculum_start", "0"], "--curriculum_start must be at least 1"),
    (["--curriculum_start", "100", "--curriculum_end", "50"], "--curriculum_start <= --curriculum_end"),
    (["--eval_inference_steps", "1", "0"], "--eval_inference_steps must be between 1 and 40"),
    (["--eval_inference_steps", "1", "41"], r"--eval_inference_steps must be between 1 and 40 \(the sampler's noise"),
    (["--eval_num_samples", "1"], "--eval_num_samples must be at least 2"),
    pytest.param(["--enable_xformers_memory_efficient_attention"], "needs the xformers package",
                 marks=skip_if_installed("xformers")),
    (["--train_data_dir", "/no/such/folder"], "--train_data_dir /no/such/folder is not a directory"),
])
def test_bad_flags_are_refused_before_anything_loads(trainer, argv, message):
    with pytest.raises(ValueError, match=message):
        trainer.parse_args(argv)


@pytest.mark.parametrize("case", ["label_missing", "label_not_classes", "image_column", "resolution"])
def test_data_errors_name_the_culprit(trainer, tmp_path, tiny_args, case):
    argv = tiny_args(tmp_path / "run", "--max_train_steps", 1, "--report_to", "none")
    argv, message = {
        "label_missing": (argv + ["--class_conditional", "--label_column", "kind"],
                          "--label_column 'kind' is not a column"),
        "label_not_classes": (argv + ["--class_conditional", "--label_column", "image"], "not a datasets ClassLabel"),
        "image_column": (argv + ["--image_column", "img"], "--image_column 'img' is not a column"),
        "resolution": (argv + ["--resolution", "7"], "--resolution 7 does not fit the UNet"),
    }[case]
    with pytest.raises(ValueError, match=message):
        run_in_process(trainer, argv)
