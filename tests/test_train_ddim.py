"""train_immiscible_ddim.py end to end: launched runs (1 and 2 processes) and in-process runs with spies.

Launches cost several seconds of imports each, so there are three; the rest runs `main()` in this process.
"""

import json
import signal
from pathlib import Path

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet2DModel
from PIL import Image
from safetensors.torch import load_file

from conftest import skip_if_installed, write_images
from launching import interrupt_after_first_step, launch_command, launch_environment
from trainer_runs import checkpoints, launch, load_script, run_in_process, scalars, spy_on_noise, summary

import immiscible_pipeline.training.hub_publishing as hub
import immiscible_pipeline.training.pixel_objectives as pixel_objectives
import immiscible_pipeline.training.pixel_run as pixel_run
import immiscible_pipeline.training.step_bookkeeping as step_bookkeeping
from immiscible_pipeline import TrainingCoupling

PROJECT = "train_immiscible_ddim"  # its TensorBoard folder
SCRIPT = Path(__file__).resolve().parents[1] / "train_immiscible_ddim.py"


@pytest.fixture(scope="module")
def trainer():
    return load_script(SCRIPT)


@pytest.fixture
def tiny_args(tiny_imagefolder, tiny_unet_config_path, tmp_path):
    """Arguments for a tiny run: 12 images of the shared folder, 8 px, batch 4, 2 DDIM steps for samples."""
    def make(output_dir, *extra):
        return ["--train_data_dir", str(tiny_imagefolder), "--model_config_name_or_path", str(tiny_unet_config_path),
                "--output_dir", str(output_dir), "--cache_dir", str(tmp_path / "datasets-cache"),
                "--train_batch_size", "4", "--ddim_num_inference_steps", "2", "--num_validation_images", "4",
                "--seed", "0", *map(str, extra)]
    return make


# --- launched runs ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_launched_training_saves_a_pipeline_rotates_checkpoints_and_resumes(tmp_path, tiny_args):
    output = tmp_path / "run"
    launch(SCRIPT, tiny_args(output, "--max_train_steps", 4, "--checkpointing_steps", 2, "--checkpoints_total_limit", 1,
                             "--validation_steps", 3, "--use_ema", "--random_flip"))
    assert checkpoints(output) == ["checkpoint-4"]  # checkpoint-2 rotated away
    assert {"unet", "unet_ema", "optimizer.bin", "random_states_0.pkl"} <= {
        path.name for path in (output / "checkpoint-4").iterdir()}
    assert (output / "samples" / "step-000003.png").is_file() and (output / "samples.png").is_file()
    pipeline = DiffusionPipeline.from_pretrained(output)
    assert isinstance(pipeline, DDIMPipeline)
    images = pipeline(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert [image.size for image in images] == [(8, 8), (8, 8)] and images[0].mode == "RGB"
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert summary(output)["global_step"] == 4 and summary(output)["num_processes"] == 1
    logged = scalars(output, PROJECT)
    assert logged["immiscible/batch_size"] == 4 and logged["immiscible/relative_reduction"] >= 0
    assert {"loss", "lr", "immiscible/time_ms", "ema_decay"} <= set(logged) and logged["images"] == ["samples"]

    result = launch(SCRIPT, tiny_args(output, "--max_train_steps", 6, "--checkpointing_steps", 2,
                                      "--checkpoints_total_limit", 1, "--validation_steps", 3, "--use_ema",
                                      "--random_flip", "--resume_from_checkpoint", "latest"))
    assert f"Resuming from checkpoint {output / 'checkpoint-4'}" in result.stdout + result.stderr
    assert checkpoints(output) == ["checkpoint-6"] and summary(output)["global_step"] == 6


@pytest.mark.slow
def test_two_processes_assign_over_the_global_batch_and_evaluate_fid(tmp_path, tiny_args, monkeypatch):
    output = tmp_path / "run"
    monkeypatch.setenv("IMMISCIBLE_CACHE", str(tmp_path / "eval-cache"))
    launch(SCRIPT, tiny_args(output, "--max_train_steps", 2, "--train_batch_size", 3, "--assignment_scope", "global",
                             "--checkpointing_steps", 100, "--validation_steps", 100, "--eval_steps", 1,
                             "--eval_feature", "inception", "--eval_num_samples", 4, "--eval_num_reference", 6),
           processes=2)
    assert summary(output)["num_processes"] == 2 and summary(output)["total_batch_size"] == 6
    logged = scalars(output, PROJECT)
    assert logged["immiscible/num_processes"] == 2 and logged["immiscible/batch_size"] == 6  # both batches as one
    assert isinstance(DiffusionPipeline.from_pretrained(output), DDIMPipeline)
    # FID during training: at every --eval_steps and at the end, once (main process), logged to the tracker.
    history = [json.loads(line) for line in (output / "eval_history.jsonl").read_text().splitlines()]
    assert [record["step"] for record in history] == [1, 2]
    assert all(record["fid"] > 0 and record["feature"] == "inception" for record in history)
    steps = history[-1]["num_inference_steps"]  # --ddim_num_inference_steps: the default DDIM step count
    assert steps == summary(output)["ddim_num_inference_steps"]
    assert logged[f"eval/{steps}_step/fid"] == pytest.approx(history[-1]["fid"], rel=1e-5)
    assert f"eval/{steps}_step/kid_mean" in logged


# --- in-process runs -------------------------------------------------------------------------------------

class Interrupted(Exception):
    pass


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(trainer, tmp_path, tiny_args, monkeypatch):
    # 12 images, batch 4, accumulation 2: updates of [b0 b1] [b2] per epoch; checkpoint 3 is mid-epoch 1.
    flags = ["--max_train_steps", 5, "--gradient_accumulation_steps", 2, "--checkpointing_steps", 3,
             "--validation_steps", 2, "--use_ema", "--random_flip", "--lr_warmup_steps", 2, "--learning_rate", 1e-3,
             "--report_to", "none"]
    calls, real_save = spy_on_noise(trainer, monkeypatch), step_bookkeeping.save_checkpoint

    def save_then_crash(accelerator, output_dir, step, total_limit=None):
        path = real_save(accelerator, output_dir, step, total_limit)
        if step == 3 and "interrupted" in str(output_dir):
            raise Interrupted
        return path

    monkeypatch.setattr(step_bookkeeping, "save_checkpoint", save_then_crash)  # where TrainingProgress calls it
    run_in_process(trainer, tiny_args(tmp_path / "straight", *flags))
    assert len(calls) == 8
    assert not torch.equal(calls[0], calls[3])  # epoch 1 is shuffled and augmented anew
    with pytest.raises(Interrupted):
        run_in_process(trainer, tiny_args(tmp_path / "interrupted", *flags))
    calls.clear()
    run_in_process(trainer, tiny_args(tmp_path / "interrupted", *flags, "--resume_from_checkpoint", "latest"))
    assert len(calls) == 3  # only the batches after checkpoint-3 were trained again

    weights = "unet/diffusion_pytorch_model.safetensors"
    straight, resumed = load_file(tmp_path / "straight" / weights), load_file(tmp_path / "interrupted" / weights)
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    grids = [Image.open(tmp_path / run / "samples.png").tobytes() for run in ("straight", "interrupted")]
    assert grids[0] == grids[1]


def test_ctrl_c_checkpoints_at_the_step_boundary_and_the_resumed_run_is_exact(trainer, tmp_path, tiny_args,
                                                                               monkeypatch):
    # As above, but no periodic checkpoint: Ctrl-C arrives during step 3's first micro-batch.
    flags = ["--max_train_steps", 5, "--gradient_accumulation_steps", 2, "--checkpointing_steps", 100,
             "--validation_steps", 100, "--use_ema", "--random_flip", "--lr_warmup_steps", 2, "--learning_rate", 1e-3,
             "--report_to", "none"]
    interrupt_on_call = set()
    calls = spy_on_noise(trainer, monkeypatch, interrupt_on_call)
    run_in_process(trainer, tiny_args(tmp_path / "straight", *flags))
    calls.clear()
    interrupt_on_call.add(4)
    previous_handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stopped:
        run_in_process(trainer, tiny_args(tmp_path / "interrupted", *flags))
    assert stopped.value.code == 130 and len(calls) == 5  # step 3 was finished, then nothing more
    assert checkpoints(tmp_path / "interrupted") == ["checkpoint-3"]
    assert not (tmp_path / "interrupted" / "model_index.json").exists()  # no half-trained pipeline
    assert signal.getsignal(signal.SIGINT) is previous_handler

    calls.clear()
    interrupt_on_call.clear()
    run_in_process(trainer, tiny_args(tmp_path / "interrupted", *flags, "--resume_from_checkpoint", "latest"))
    assert len(calls) == 3
    weights = "unet/diffusion_pytorch_model.safetensors"
    straight, resumed = load_file(tmp_path / "straight" / weights), load_file(tmp_path / "interrupted" / weights)
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


def test_resuming_from_the_final_checkpoint_trains_nothing_more(trainer, tmp_path, tiny_args, monkeypatch):
    flags = ["--max_train_steps", 2, "--checkpointing_steps", 2, "--validation_steps", 100, "--report_to", "none"]
    calls = spy_on_noise(trainer, monkeypatch)
    run_in_process(trainer, tiny_args(tmp_path, *flags))
    weights = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    calls.clear()
    run_in_process(trainer, tiny_args(tmp_path, *flags, "--resume_from_checkpoint", "latest"))
    assert calls == [] and summary(tmp_path)["global_step"] == 2  # 12 images, batch 4: mid-epoch, yet no step 3
    again = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(weights[key], again[key]) for key in weights)

    # the same command without the resume flag would start over beside the old checkpoint: refused, unless asked
    with pytest.raises(ValueError, match="holds an earlier run \\(checkpoint-2\\): pass --resume_from_checkpoint"):
        run_in_process(trainer, tiny_args(tmp_path, *flags))
    calls.clear()
    run_in_process(trainer, tiny_args(tmp_path, *flags, "--overwrite_output_dir"))
    assert len(calls) == 2 and summary(tmp_path)["global_step"] == 2


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.slow
def test_ctrl_c_in_a_terminal_stops_a_launched_run_with_a_checkpoint(tmp_path, tiny_args, processes):
    # Ctrl-C reaches the launcher's process group (with 2 processes torchrun passes it on to the ranks);
    # all ranks must stop at the same step and save it together.
    output = tmp_path / "run"
    command = launch_command(processes, SCRIPT, *tiny_args(output, "--max_train_steps", 100000, "--checkpointing_steps",
                                                           100000, "--validation_steps", 100000, "--report_to",
                                                           "none", "--train_batch_size", 2))
    result = interrupt_after_first_step(command, timeout=300, env=launch_environment())
    assert result.returncode != 0 and "Interrupted at step" in result.stdout, result.stdout[-4000:]
    (saved,) = checkpoints(output)
    assert f"Interrupted at step {saved.removeprefix('checkpoint-')}:" in result.stdout
    assert {"unet", "optimizer.bin", *(f"random_states_{rank}.pkl" for rank in range(processes))} <= {
        path.name for path in (output / saved).iterdir()}


def test_the_loss_target_and_the_added_noise_are_the_assigned_noise(trainer, tmp_path, tiny_args, monkeypatch):
    returned, losses, added, gammas = [], [], [], []
    real_build, real_loss = pixel_run.build_immiscible, pixel_objectives.min_snr_loss
    real_add_noise = DDPMScheduler.add_noise

    def build_permuting(*args, **kwargs):
        imm = real_build(*args, **kwargs)

        class Permuting:  # returns a noise no plain draw would give: the assigned noise, rolled by one sample
            last_stats = property(lambda self: imm.last_stats)

            def __call__(self, x0, **kw):
                noise = imm(x0, **kw).roll(1, dims=0)
                returned.append(noise.clone())
                return noise
        return Permuting()

    def recording_loss(scheduler, model_pred, clean, noise, timesteps, snr_gamma):
        losses.append(noise.clone())
        gammas.append(snr_gamma)
        return real_loss(scheduler, model_pred, clean, noise, timesteps, snr_gamma)

    def recording_add_noise(self, original, noise, timesteps):
        added.append(noise.clone())
        return real_add_noise(self, original, noise, timesteps)

    monkeypatch.setattr(pixel_run, "build_immiscible", build_permuting)
    monkeypatch.setattr(pixel_objectives, "min_snr_loss", recording_loss)
    monkeypatch.setattr(DDPMScheduler, "add_noise", recording_add_noise)
    # "global" with one process must simply work (the same as local).
    run_in_process(trainer, tiny_args(tmp_path / "run", "--max_train_steps", 3, "--report_to", "none",
                                      "--assignment_scope", "global", "--snr_gamma", 5))
    assert len(returned) == len(losses) == len(added) == 3 and gammas == [5.0] * 3  # min-SNR weighting, as asked
    for mine, target, noised in zip(returned, losses, added):
        assert torch.equal(mine, target) and torch.equal(mine, noised)


def test_push_to_hub_writes_the_card_and_uploads_without_checkpoints(trainer, tmp_path, tiny_args, monkeypatch):
    output = tmp_path / "run"
    created, uploaded = [], []

    def fake_create_repo(**kwargs):
        created.append({**kwargs, "trained_yet": (output / "unet").exists()})
        return type("Repo", (), {"repo_id": "me/tiny-ddim"})()

    monkeypatch.setattr(hub, "create_repo", fake_create_repo)
    monkeypatch.setattr(hub, "upload_folder", lambda **kwargs: uploaded.append(kwargs))
    run_in_process(trainer, tiny_args(output, "--max_train_steps", 2, "--checkpointing_steps", 1, "--report_to", "none",
                                      "--immiscible", "knn", "--immiscible_k", 4, "--push_to_hub", "--hub_model_id",
                                      "tiny-ddim", "--hub_token", "tok", "--hub_private_repo",
                                      # flags not exercised elsewhere: they must at least run end to end
                                      "--prediction_type", "v_prediction", "--center_crop", "--gradient_checkpointing",
                                      "--dataloader_num_workers", 1, "--mixed_precision", "bf16"))
    assert created == [{"repo_id": "tiny-ddim", "exist_ok": True, "token": "tok", "private": True,
                        "trained_yet": False}]
    (upload,) = uploaded
    assert upload["folder_path"] == str(output) and upload["repo_id"] == "me/tiny-ddim"
    assert upload["ignore_patterns"] == ["checkpoint-*"] and upload["token"] == "tok"
    assert DDPMScheduler.from_pretrained(output / "scheduler").config.prediction_type == "v_prediction"
    card = (output / "README.md").read_text()
    for text in ("- immiscible-diffusion", "- immiscible-knn", "- ddim", "| assignment | knn |", "| k (knn) | 4 |",
                 "| assignment scope | local |", "| batch size (total) | 4 |", "| steps | 2 |",
                 "| mixed precision | bf16 |", "| prediction type | v_prediction |", "| beta schedule | linear |",
                 "| min-SNR gamma | - |",
                 f"| dataset | image folder {tiny_args(output)[1]} |", "![samples](samples.png)",
                 'DiffusionPipeline.from_pretrained("me/tiny-ddim")',
                 "| stochastic sampling | matched re-noising (immiscible_coupling.json) |",
                 "matched_renoise(pipeline)", "eta=1.0"):
        assert text in card, text
    # The coupling that stochastic sampling must keep, beside the pipeline: KNN k = 4 of batches of 4
    assert TrainingCoupling.load(str(output)) == TrainingCoupling(method="knn", group_size=4, k=4)


# --- diffusers' train_unconditional.py command lines ------------------------------------------------------

def test_diffusers_train_unconditional_test_commands_run_unchanged(trainer, tmp_path, tiny_unet_config_path):
    """The commands of diffusers' test_unconditional.py, flags verbatim (a 6-image folder and the tiny UNet
    instead of the Hub's dummies; --use_ema, --center_crop, --random_flip as in its EMA variant)."""
    data, output = tmp_path / "data", tmp_path / "run"
    write_images(data, count=6)

    def command(num_epochs, *extra):
        return ["--train_data_dir", str(data), "--model_config_name_or_path", str(tiny_unet_config_path),
                "--resolution", "8", "--output_dir", str(output), "--train_batch_size", "1", "--num_epochs",
                str(num_epochs), "--gradient_accumulation_steps", "1", "--ddpm_num_inference_steps", "1",
                "--learning_rate", "1e-3", "--lr_warmup_steps", "5", "--use_ema", "--center_crop", "--random_flip",
                *extra]

    run_in_process(trainer, command(1, "--checkpointing_steps=2", "--eval_batch_size", "2"))
    assert checkpoints(output) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (output / "scheduler" / "scheduler_config.json").is_file()
    assert summary(output)["ddim_num_inference_steps"] == 1 and summary(output)["num_validation_images"] == 2
    # An intermediate checkpoint's UNet is a diffusers folder that samples.
    unet = UNet2DModel.from_pretrained(output, subfolder="checkpoint-4/unet")
    images = DDIMPipeline(unet=unet, scheduler=DDIMScheduler())(batch_size=1, num_inference_steps=1).images
    assert images[0].size == (8, 8)

    run_in_process(trainer, command(2, "--resume_from_checkpoint=checkpoint-6", "--checkpointing_steps=2",
                                    "--checkpoints_total_limit=2"))
    assert checkpoints(output) == ["checkpoint-10", "checkpoint-12"]  # resumed at 6: 8 and 10 rotated away
    assert summary(output)["global_step"] == 12


# --- flags and errors ------------------------------------------------------------------------------------

def test_the_demo_batches_its_digits_from_memory(trainer):
    """The bundled MNIST's square digits are resized once (PreparedTrainImages), not at every step."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from immiscible_pipeline.data import PreparedTrainImages
    from immiscible_pipeline.training.pixel_trainers import pixel_training_data

    args = trainer.parse_args(["--train_batch_size", "4", "--resolution", "16"])  # main() takes it from the UNet
    single_process = SimpleNamespace(is_main_process=True, main_process_first=nullcontext)
    _, images, loader, _, names = pixel_training_data(args, single_process, channels=1, label_column="label")
    assert type(images) is PreparedTrainImages and len(images) == 50_000 and names == [str(d) for d in range(10)]
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, 1, 16, 16) and batch["label"].shape == (4,)
    assert -1 <= batch["pixel_values"].min() < batch["pixel_values"].max() <= 1


def test_defaults_follow_the_recipe_diffusers_for_a_dataset_and_the_demo_without(trainer, tiny_imagefolder):
    demo = trainer.parse_args([])
    assert demo.bundled_demo and demo.recipe == "mnist-demo"
    for flag, value in trainer.RECIPES["mnist-demo"].defaults.items():
        assert flag == "unet" or getattr(demo, flag) == (value or None if flag == "snr_gamma" else value), flag
    mine = trainer.parse_args(["--no-use_ema", "--max_train_steps", "10", "--learning_rate", "1e-5"])
    assert (mine.use_ema, mine.max_train_steps, mine.learning_rate) == (False, 10, 1e-5)  # flags given win
    # A diffusers train_unconditional.py command line trains what it would: its UNet at 64 px, batch 16, 1e-4
    dataset = trainer.parse_args(["--train_data_dir", str(tiny_imagefolder)])
    assert not dataset.bundled_demo and dataset.recipe == "diffusers" and dataset.max_train_steps is None
    assert (dataset.train_batch_size, dataset.learning_rate, dataset.lr_warmup_steps, dataset.use_ema) == (
        16, 1e-4, 500, False)
    assert (dataset.prediction_type, dataset.ddpm_beta_schedule, dataset.snr_gamma) == ("epsilon", "linear", None)
    assert (dataset.lr_scheduler, dataset.adam_beta1, dataset.adam_weight_decay) == ("cosine", 0.95, 1e-6)
    assert dataset.mixed_precision == "no"  # its --mixed_precision default, which overrides `accelerate config`
    assert trainer.RECIPES["diffusers"].defaults["unet"]["sample_size"] == 64
    # our own set-up goes by name: DDPM's CIFAR-10 optimiser and schedule, not train_unconditional.py's
    paper = trainer.parse_args(["--train_data_dir", str(tiny_imagefolder), "--recipe", "cifar10-paper"])
    assert (paper.train_batch_size, paper.learning_rate, paper.lr_warmup_steps, paper.use_ema) == (
        128, 2e-4, 5000, True)
    assert (paper.lr_scheduler, paper.adam_beta1, paper.adam_weight_decay) == ("constant_with_warmup", 0.9, 0.0)
    given = trainer.parse_args(["--recipe", "cifar10-paper", "--lr_scheduler", "linear", "--adam_beta1", "0.8"])
    assert (given.lr_scheduler, given.adam_beta1, given.adam_weight_decay) == ("linear", 0.8, 0.0)
    assert trainer.parse_args(["--snr_gamma", "0"]).snr_gamma is None
    assert (demo.eval_feature, dataset.eval_feature) == ("classifier", "inception")
    assert dataset.eval_inference_steps == [dataset.ddim_num_inference_steps]
    # the demo's step count stands in only when neither --num_epochs nor --max_train_steps is given
    assert (demo.num_epochs, dataset.num_epochs) == (100, 100)
    epochs = trainer.parse_args(["--num_epochs", "2"])
    assert (epochs.num_epochs, epochs.max_train_steps) == (2, None)
    assert epochs.train_batch_size == trainer.RECIPES["mnist-demo"].defaults["train_batch_size"]


@pytest.mark.parametrize("argv, message", [
    (["--immiscible_k", "0"], "--immiscible_k must be at least 1, got 0"),
    pytest.param(["--report_to", "wandb", "--hub_token", "x"], "--report_to wandb needs wandb",
                 marks=skip_if_installed("wandb")),
    pytest.param(["--enable_xformers_memory_efficient_attention"], "needs the xformers package",
                 marks=skip_if_installed("xformers")),
    (["--dataset_name", "cifar10", "--train_data_dir", "."], "either --dataset_name or --train_data_dir, not both"),
    (["--train_data_dir", "/no/such/folder"], "--train_data_dir /no/such/folder is not a directory"),
    (["--eval_steps", "0"], "--eval_steps must be at least 1, got 0"),
    (["--eval_num_samples", "1"], "--eval_num_samples must be at least 2"),
    (["--snr_gamma", "-1"], "--snr_gamma must be positive, or 0 for no min-SNR weighting; got -1.0"),
    (["--ddpm_num_steps", "50", "--ddim_num_inference_steps", "60"],
     "--ddim_num_inference_steps 60 is more than --ddpm_num_steps 50"),
    (["--eval_inference_steps", "2000"], "--eval_inference_steps 2000 is more than --ddpm_num_steps 1000"),
])
def test_bad_flags_are_refused_before_anything_loads(trainer, argv, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        trainer.parse_args(argv)


def test_hub_token_with_wandb_is_refused(trainer, monkeypatch):
    import immiscible_pipeline.training.arguments

    # as if wandb were there
    monkeypatch.setattr(immiscible_pipeline.training.arguments, "check_report_to", lambda report_to: None)
    with pytest.raises(ValueError, match="--report_to=wandb and --hub_token"):
        trainer.parse_args(["--report_to", "wandb", "--hub_token", "x"])


def _broken_folder(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "good.png")
    (folder / "bad.png").write_bytes(b"not a png at all")
    return folder


@pytest.mark.parametrize("case", ["column", "resolution", "corrupt", "empty", "checkpoint"])
def test_data_and_model_errors_name_the_culprit(trainer, tmp_path, tiny_args, case):
    argv = tiny_args(tmp_path / "run", "--max_train_steps", 1, "--report_to", "none")
    if case == "column":
        argv, message = argv + ["--image_column", "img"], r"--image_column 'img' is not a column .*: image, label"
    elif case == "resolution":
        argv, message = argv + ["--resolution", "7"], "--resolution 7 does not fit the UNet"
    elif case == "corrupt":
        argv[1] = str(_broken_folder(tmp_path))
        message = r"cannot read the image .*bad\.png"
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        argv[1] = str(tmp_path / "empty")
        message = "--train_data_dir .*empty holds no images"
    else:
        argv, message = argv + ["--resume_from_checkpoint", "checkpoint-9"], "no such checkpoint folder"
    with pytest.raises(ValueError, match=message):
        run_in_process(trainer, argv)
