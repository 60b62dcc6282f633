"""train_immiscible_flow.py: launched 1- and 2-process runs, the saved pipeline loads and samples with plain
diffusers, the training's timesteps and interpolation are the sampler's, exact resume after Ctrl-C, the loss is
built from the assigned noise, the model card, clear errors for bad flags."""

import json
import signal
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, UNet2DModel
from safetensors.torch import load_file
from trainer_runs import checkpoints, launch, load_script, run_in_process, spy_on_noise, summary

import immiscible_pipeline.training.hub_publishing as hub
import immiscible_pipeline.training.pixel_objectives as pixel_objectives
import immiscible_pipeline.training.pixel_run as pixel_run
from immiscible_pipeline import TrainingCoupling
from immiscible_pipeline.training.pixel_objectives import FlowObjective

SCRIPT = Path(__file__).resolve().parents[1] / "train_immiscible_flow.py"


@pytest.fixture(scope="module")
def trainer():
    return load_script(SCRIPT)


@pytest.fixture
def tiny_args(tiny_imagefolder, tiny_unet_config_path, tmp_path):
    """A tiny run: the 12 images of the shared folder at 8 px, batch 4, grids of 1 and 2 Euler steps."""
    def make(output_dir, *extra):
        return ["--train_data_dir", str(tiny_imagefolder), "--model_config_name_or_path", str(tiny_unet_config_path),
                "--output_dir", str(output_dir), "--cache_dir", str(tmp_path / "datasets-cache"),
                "--train_batch_size", "4", "--validation_inference_steps", "1", "2", "--num_validation_images", "4",
                "--seed", "0", *map(str, extra)]
    return make


# --- launched runs ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_launched_run_saves_a_stock_flow_pipeline_that_samples_and_resumes(tmp_path, tiny_args):
    output = tmp_path / "run"
    launch(SCRIPT, tiny_args(output, "--max_train_steps", 3, "--checkpointing_steps", 2, "--validation_steps", 2,
                             "--immiscible", "knn"))
    assert checkpoints(output) == ["checkpoint-2"] and (output / "samples" / "step-000002.png").is_file()
    pipeline = DiffusionPipeline.from_pretrained(output)  # plain diffusers
    assert isinstance(pipeline, DDPMPipeline) and isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler)
    images = pipeline(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images
    assert [image.size for image in images] == [(8, 8), (8, 8)] and images[0].mode == "RGB"
    config = summary(output)
    assert (config["recipe"], config["weighting_scheme"], config["immiscible_k"]) == ("cifar10-paper", "uniform", 4)
    assert TrainingCoupling.load(str(output)).method == "knn"  # Euler needs no re-noising; recorded all the same

    result = launch(SCRIPT, tiny_args(output, "--max_train_steps", 4, "--checkpointing_steps", 2,
                                      "--validation_steps", 100, "--immiscible", "knn", "--resume_from_checkpoint",
                                      "latest"))
    assert f"Resuming from checkpoint {output / 'checkpoint-2'}" in result.stdout + result.stderr
    assert summary(output)["global_step"] == 4


@pytest.mark.slow
def test_two_processes_assign_over_the_global_batch_and_evaluate_at_each_euler_count(tmp_path, tiny_args,
                                                                                      monkeypatch):
    output = tmp_path / "run"
    monkeypatch.setenv("IMMISCIBLE_CACHE", str(tmp_path / "eval-cache"))
    launch(SCRIPT, tiny_args(output, "--max_train_steps", 2, "--train_batch_size", 3, "--assignment_scope", "global",
                             "--immiscible", "linear", "--checkpointing_steps", 100, "--validation_steps", 100,
                             "--eval_steps", 2, "--eval_feature", "inception", "--eval_num_samples", 4,
                             "--eval_num_reference", 6, "--eval_inference_steps", 1, 2), processes=2)
    assert summary(output)["num_processes"] == 2 and summary(output)["total_batch_size"] == 6
    history = [json.loads(line) for line in (output / "eval_history.jsonl").read_text().splitlines()]
    assert [(record["step"], record["num_inference_steps"]) for record in history] == [(2, 1), (2, 2)]
    assert history[0]["fid"] != history[1]["fid"]  # two samplers, two scores
    # linear assignment over both processes' batches: groups of 6
    assert TrainingCoupling.load(str(output)) == TrainingCoupling(method="linear", group_size=6, scope="global",
                                                                  num_processes=2)


# --- sampling parity -------------------------------------------------------------------------------------

class PointMassVelocity(torch.nn.Module):
    """The exact velocity field of rectified flow towards one image x0, read from the timestep as the UNet
    reads it: s = t / 1000, v(x, s) = (x - x0) / s. Records the timesteps it is given."""

    def __init__(self, x0):
        super().__init__()
        self.x0, self.seen = x0, []
        self.config = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 4),
                                  norm_num_groups=2, down_block_types=("DownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "UpBlock2D")).config
        self.dtype, self.device = torch.float32, torch.device("cpu")

    def forward(self, sample, timestep, class_labels=None):
        self.seen.append(float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep))
        sigma = torch.as_tensor(timestep, dtype=sample.dtype).reshape(-1, 1, 1, 1) / 1000
        return type("Output", (), {"sample": (sample - self.x0) / sigma})()


def test_training_timesteps_and_targets_are_those_the_stock_euler_sampler_integrates():
    x0 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model = PointMassVelocity(x0)
    objective = FlowObjective("uniform")
    # Training: with the exact velocity the loss vanishes, so t = 1000 s, (1 - s) x0 + s z and z - x0 fit together
    torch.manual_seed(0)
    noise = torch.randn_like(x0)
    assert objective.loss(model, x0, noise, step=0, total_steps=1).item() < 1e-8
    trained_timesteps = model.seen[-1]
    assert 0 < trained_timesteps <= 1000
    # Sampling: the stock pipeline's Euler steps follow the same straight path to x0 at any step count
    for steps in (1, 2, 5):
        model.seen.clear()
        pipeline = objective.pipeline(model)
        pipeline.register_to_config()
        pipeline.set_progress_bar_config(disable=True)
        images = pipeline(batch_size=2, num_inference_steps=steps, output_type="np",
                          generator=torch.Generator().manual_seed(1)).images
        expected = ((x0 / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
        assert abs(images - expected).max() < 1e-5, steps
        assert model.seen[0] == 1000.0 and len(model.seen) == steps  # the UNet first sees s = 1 as t = 1000


# --- in-process runs -------------------------------------------------------------------------------------

def test_ctrl_c_checkpoints_and_the_resumed_run_ends_with_the_uninterrupted_weights(trainer, tmp_path, tiny_args,
                                                                                   monkeypatch):
    flags = ["--max_train_steps", 5, "--gradient_accumulation_steps", 2, "--checkpointing_steps", 100,
             "--validation_steps", 100, "--random_flip", "--lr_warmup_steps", 2, "--learning_rate", 1e-3,
             "--immiscible", "linear", "--report_to", "none"]
    interrupt_on_call = set()
    calls = spy_on_noise(trainer, monkeypatch, interrupt_on_call)
    run_in_process(trainer, tiny_args(tmp_path / "straight", *flags))
    calls.clear()
    interrupt_on_call.add(4)
    previous_handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stopped:
        run_in_process(trainer, tiny_args(tmp_path / "interrupted", *flags))
    assert stopped.value.code == 130 and checkpoints(tmp_path / "interrupted") == ["checkpoint-3"]
    assert not (tmp_path / "interrupted" / "model_index.json").exists()  # no half-trained pipeline
    assert signal.getsignal(signal.SIGINT) is previous_handler
    calls.clear()
    interrupt_on_call.clear()
    run_in_process(trainer, tiny_args(tmp_path / "interrupted", *flags, "--resume_from_checkpoint", "latest"))
    assert len(calls) == 3  # only the micro-batches after checkpoint-3
    weights = "unet/diffusion_pytorch_model.safetensors"
    straight, resumed = load_file(tmp_path / "straight" / weights), load_file(tmp_path / "interrupted" / weights)
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


def test_the_velocity_target_is_built_from_the_assigned_noise_and_the_card_says_how_to_sample(
        trainer, tmp_path, tiny_args, monkeypatch):
    returned, targets = [], []
    real_build, real_loss = pixel_run.build_immiscible, pixel_objectives.flow_matching_loss

    def build_rolling(*args, **kwargs):
        imm = real_build(*args, **kwargs)

        class Rolling:  # a noise no plain draw gives: the assigned noise rolled by one sample
            last_stats = property(lambda self: imm.last_stats)

            def __call__(self, x0, **kw):
                returned.append(imm(x0, **kw).roll(1, dims=0))
                return returned[-1]
        return Rolling()

    def recording_loss(model_pred, clean, noise, noisy, sigmas, weighting_scheme):
        targets.append((noise.clone(), noisy.clone(), sigmas.clone(), weighting_scheme))
        return real_loss(model_pred, clean, noise, noisy, sigmas, weighting_scheme)

    monkeypatch.setattr(pixel_run, "build_immiscible", build_rolling)
    monkeypatch.setattr(pixel_objectives, "flow_matching_loss", recording_loss)
    monkeypatch.setattr(hub, "create_repo", lambda **kwargs: type("Repo", (), {"repo_id": "me/tiny-flow"})())
    uploaded = []
    monkeypatch.setattr(hub, "upload_folder", lambda **kwargs: uploaded.append(kwargs))
    run_in_process(trainer, tiny_args(tmp_path / "run", "--max_train_steps", 2, "--report_to", "none",
                                      "--weighting_scheme", "logit_normal", "--push_to_hub", "--hub_token", "tok"))
    assert len(returned) == len(targets) == 2
    for noise, (target_noise, noisy, sigmas, scheme) in zip(returned, targets):
        assert torch.equal(noise, target_noise) and scheme == "logit_normal"
        clean = (noisy - sigmas.reshape(-1, 1, 1, 1) * noise) / (1 - sigmas.reshape(-1, 1, 1, 1))
        assert clean.abs().max() <= 1 + 1e-4  # the noisy input was mixed from the images and this noise
    card = (tmp_path / "run" / "README.md").read_text()
    for text in ("- flow-matching", "| timestep density | logit_normal |", "num_inference_steps=8",
                 "DiffusionPipeline.from_pretrained(\"me/tiny-flow\")", "| recipe | cifar10-paper |"):
        assert text in card, text
    assert uploaded and uploaded[0]["repo_id"] == "me/tiny-flow"


# --- flags and errors ------------------------------------------------------------------------------------

def test_recipes_fill_unset_flags_the_demo_without_a_dataset(trainer, tiny_imagefolder):
    demo = trainer.parse_args([])
    assert demo.bundled_demo and demo.recipe == "mnist-demo" and demo.immiscible_k == 4
    for flag, value in trainer.RECIPES["mnist-demo"].defaults.items():
        assert flag == "unet" or getattr(demo, flag) == value, flag
    dataset = trainer.parse_args(["--train_data_dir", str(tiny_imagefolder)])
    assert dataset.recipe == "cifar10-paper" and dataset.weighting_scheme == "uniform"
    # torchcfm's CIFAR-10 optimiser: Adam 2e-4 without weight decay, constant after 5000 warm-up steps
    assert (dataset.lr_scheduler, dataset.adam_beta1, dataset.adam_weight_decay, dataset.lr_warmup_steps) == (
        "constant_with_warmup", 0.9, 0.0, 5000)
    mine = trainer.parse_args(["--train_data_dir", str(tiny_imagefolder), "--recipe", "mnist-demo",
                               "--train_batch_size", "7"])
    assert (mine.train_batch_size, mine.weighting_scheme) == (7, "logit_normal")  # a given flag wins


@pytest.mark.parametrize("argv, message", [
    (["--weighting_scheme", "cosine"], "invalid choice: 'cosine'"),
    (["--eval_inference_steps", "0"], "--eval_inference_steps must all be at least 1"),
    (["--validation_inference_steps", "4", "0"], "--validation_inference_steps must all be at least 1"),
    (["--logit_std", "0"], "--logit_std and --shift must be positive"),
    (["--train_data_dir", "/no/such/folder"], "--train_data_dir /no/such/folder is not a directory"),
    (["--enable_xformers_memory_efficient_attention"], "needs the xformers package"),
    (["--recipe", "cifar100"], "invalid choice: 'cifar100'"),
])
def test_bad_flags_are_refused_naming_the_flag(trainer, argv, message, capsys):
    with pytest.raises((ValueError, SystemExit)) as error:
        trainer.parse_args(argv)
    said = str(error.value) if error.type is ValueError else capsys.readouterr().err
    assert message in said
