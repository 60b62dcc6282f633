"""The losses, checkpoints, accelerator_setup, interruption and sample_grids modules of
immiscible_pipeline.training: loss targets and min-SNR, checkpoints, resume position, EMA hooks, Ctrl-C,
trackers, grids."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel, compute_snr
from PIL import Image

from conftest import skip_if_installed
from immiscible_pipeline.training.accelerator_setup import tracker_config, weight_dtype
from immiscible_pipeline.training.arguments import check_report_to, check_xformers_available, min_snr_gamma
from immiscible_pipeline.training.checkpoints import (checkpoint_step, claim_output_dir, find_checkpoint,
                                                      list_checkpoints, load_ema, register_checkpoint_hooks,
                                                      resume_position, rotate_checkpoints, save_checkpoint, save_ema,
                                                      trim_eval_history, updates_per_epoch)
from immiscible_pipeline.training.interruption import StopOnSignal
from immiscible_pipeline.training.losses import diffusion_loss, min_snr_loss, training_target
from immiscible_pipeline.training.sample_grids import averaged_weights, image_grid, log_images, sample_images


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps process-wide state; each in-process Accelerator starts from a clean one."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_target_is_built_from_the_noise_given(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(4, 3, 8, 8, generator=generator), torch.randn(4, 3, 8, 8, generator=generator)
    timesteps = torch.tensor([0, 10, 50, 99])
    target = training_target(scheduler, clean, noise, timesteps)
    alpha = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    expected = {"epsilon": noise, "v_prediction": alpha.sqrt() * noise - (1 - alpha).sqrt() * clean,
                "sample": clean}[prediction_type]
    assert torch.allclose(target, expected, atol=1e-6)
    prediction = torch.randn(4, 3, 8, 8, generator=generator).half()
    assert torch.allclose(diffusion_loss(scheduler, prediction, clean, noise, timesteps),
                          ((prediction.float() - expected) ** 2).mean(), atol=1e-6)
    if prediction_type != "sample":  # another noise, another target
        other = noise.flip(0)
        assert not torch.allclose(training_target(scheduler, clean, other, timesteps), target)


def test_min_snr_loss_weights_each_sample():
    generator = torch.Generator().manual_seed(0)
    clean, noise, pred = (torch.randn(4, 4, 8, 8, generator=generator) for _ in range(3))
    timesteps = torch.tensor([1, 50, 400, 999])
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        scheduler = DDPMScheduler(prediction_type=prediction_type)
        target = {"epsilon": noise, "v_prediction": scheduler.get_velocity(clean, noise, timesteps),
                  "sample": clean}[prediction_type]
        snr = compute_snr(scheduler, timesteps)
        # min(SNR, gamma) / SNR on the noise, / (SNR + 1) on the velocity, as it is on the clean image
        divisor = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[prediction_type]
        expected = ((pred - target) ** 2).mean(dim=(1, 2, 3)) * snr.clamp(max=5.0) / divisor
        torch.testing.assert_close(min_snr_loss(scheduler, pred, clean, noise, timesteps, 5.0), expected.mean())
        assert min_snr_loss(scheduler, pred, clean, noise, timesteps) == diffusion_loss(scheduler, pred, clean, noise,
                                                                                        timesteps)


def test_snr_gamma_zero_means_plain_mse_and_the_loss_refuses_a_gamma_that_zeroes_it():
    # diffusers' scripts clamp SNR to a gamma of 0 as given: every weight 0, a loss of 0, nothing learnt
    assert min_snr_gamma(None) is None and min_snr_gamma(0.0) is None and min_snr_gamma(5.0) == 5.0
    with pytest.raises(ValueError, match="--snr_gamma must be positive, or 0 for no min-SNR weighting; got -1.0"):
        min_snr_gamma(-1.0)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    clean, noise, pred = torch.randn(3, 4, 1, 4, 4).unbind(0)
    with pytest.raises(ValueError, match="snr_gamma must be positive"):
        min_snr_loss(scheduler, pred, clean, noise, torch.tensor([10, 500, 900, 999]), 0.0)


def test_precision():
    assert weight_dtype("fp16") == torch.float16 and weight_dtype("bf16") == torch.bfloat16
    assert weight_dtype("no") == weight_dtype(None) == torch.float32


@skip_if_installed("xformers")
def test_xformers_flag_without_xformers_is_refused():
    with pytest.raises(ValueError, match="--enable_xformers_memory_efficient_attention needs the xformers"):
        check_xformers_available()


def test_report_to_checks_the_tracker_is_installed():
    check_report_to("tensorboard")
    check_report_to("none")
    assert tracker_config({"a": 1, "b": None, "c": [1, 2], "d": True}) == {"a": 1, "b": "None", "c": "[1, 2]",
                                                                         "d": True}


@skip_if_installed("wandb")
def test_report_to_wandb_without_wandb_is_refused():
    with pytest.raises(ValueError, match="--report_to wandb needs wandb"):
        check_report_to("wandb")


def _checkpoints(folder, steps):
    for step in steps:
        (folder / f"checkpoint-{step}").mkdir()
    (folder / "checkpoint-final").mkdir()  # not a step: ignored
    (folder / "unet").mkdir()


def test_checkpoint_listing_rotation_and_lookup(tmp_path):
    _checkpoints(tmp_path, [10, 200, 30])
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-30", "checkpoint-200"]
    assert checkpoint_step(tmp_path / "checkpoint-200") == 200
    assert find_checkpoint("latest", tmp_path).name == "checkpoint-200"
    assert find_checkpoint("checkpoint-30", tmp_path) == tmp_path / "checkpoint-30"  # a name in output_dir
    assert find_checkpoint(str(tmp_path / "checkpoint-10"), "elsewhere") == tmp_path / "checkpoint-10"  # a path
    assert find_checkpoint(None, tmp_path) is None and find_checkpoint("latest", tmp_path / "new") is None
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint checkpoint-5: no such checkpoint .*"
                                         r"available: \['checkpoint-10', 'checkpoint-30', 'checkpoint-200'\]"):
        find_checkpoint("checkpoint-5", tmp_path)
    assert rotate_checkpoints(tmp_path, None) == []
    removed = rotate_checkpoints(tmp_path, 2)  # the two newest stay
    assert [path.name for path in removed] == ["checkpoint-10"]
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-30", "checkpoint-200"]
    assert (tmp_path / "checkpoint-final").is_dir() and (tmp_path / "unet").is_dir()


def test_resume_position_counts_accumulated_batches():
    assert updates_per_epoch(5, 2) == 3 and updates_per_epoch(4, 2) == 2
    assert resume_position(0, 3, 2) == (0, 0)
    assert resume_position(2, 3, 2) == (0, 4)  # two updates of two batches each
    assert resume_position(3, 3, 2) == (1, 0)
    assert resume_position(7, 3, 2) == (2, 2)


def _tiny_unet(config):
    torch.manual_seed(0)
    return UNet2DModel(**config)


def test_a_signal_becomes_a_stop_request_at_the_next_check(fresh_accelerate):
    accelerator = Accelerator(cpu=True)
    previous = signal.getsignal(signal.SIGTERM)
    stop = StopOnSignal(accelerator)
    try:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)  # would end this process without the handler
        os.kill(os.getpid(), signal.SIGINT)  # a quick repeat (a launcher passing it on): the same request
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested()
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is previous

    stop = StopOnSignal(accelerator, patience=0)
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # SIGTERM never forces
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C once more: stop at once, with the old handlers back
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is previous


def test_ema_round_trip_is_exact(tmp_path, tiny_unet_config):
    model = _tiny_unet(tiny_unet_config)
    ema = EMAModel(model.parameters(), decay=0.9, use_ema_warmup=True, power=0.5, model_cls=UNet2DModel,
                   model_config=model.config)
    for _ in range(3):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param))
        ema.step(model.parameters())
    rng = torch.get_rng_state()
    save_ema(ema, tmp_path / "ema")
    assert torch.equal(torch.get_rng_state(), rng)  # saving a checkpoint must not change the training's noise
    assert UNet2DModel.from_pretrained(tmp_path / "ema") is not None  # a plain model folder
    restored = EMAModel(_tiny_unet(tiny_unet_config).parameters(), model_cls=UNet2DModel, model_config=model.config)
    rng = torch.get_rng_state()
    load_ema(restored, tmp_path / "ema")
    assert torch.equal(torch.get_rng_state(), rng)
    assert restored.optimization_step == 3 and restored.decay == 0.9 and restored.power == 0.5
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow_params, restored.shadow_params))
    assert json.loads((tmp_path / "ema" / "ema_state.json").read_text())["use_ema_warmup"] is True


def test_a_checkpoint_appears_whole_or_not_at_all(tmp_path, fresh_accelerate, monkeypatch):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    for step in (1, 2):
        save_checkpoint(accelerator, tmp_path, step, total_limit=2)
    (tmp_path / "checkpoint-3.partial").mkdir()  # left by a save that was killed
    save_checkpoint(accelerator, tmp_path, 3, total_limit=2)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert (tmp_path / "checkpoint-3" / "model.safetensors").is_file() and model is not None

    def cut_short(output_dir, **kwargs):
        os.makedirs(output_dir)
        (Path(output_dir) / "optimizer.bin").write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(accelerator, "save_state", cut_short)
    with pytest.raises(OSError):
        save_checkpoint(accelerator, tmp_path, 4, total_limit=2)
    # Nothing rotated away, and `latest` is still the last complete checkpoint.
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert find_checkpoint("latest", tmp_path).name == "checkpoint-3"


def test_checkpoint_hooks_restore_model_and_ema(tmp_path, tiny_unet_config, fresh_accelerate):
    accelerator = Accelerator(cpu=True)
    model = _tiny_unet(tiny_unet_config)
    ema = EMAModel(model.parameters(), model_cls=UNet2DModel, model_config=model.config)
    register_checkpoint_hooks(accelerator, model_folder="unet", ema=ema)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2])).sample.mean().backward()
    optimizer.step()
    ema.step(model.parameters())
    saved = {key: value.clone() for key, value in model.state_dict().items()}
    saved_ema = [param.clone() for param in ema.shadow_params]
    accelerator.save_state(str(tmp_path / "checkpoint-1"))
    assert (tmp_path / "checkpoint-1" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "checkpoint-1" / "unet_ema" / "ema_state.json").is_file()
    assert not (tmp_path / "checkpoint-1" / "model.safetensors").exists()  # saved once, by the hook
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        ema.shadow_params = [torch.zeros_like(param) for param in ema.shadow_params]
        ema.optimization_step = 0
    accelerator.load_state(str(tmp_path / "checkpoint-1"))
    assert all(torch.equal(saved[key], value) for key, value in model.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(saved_ema, ema.shadow_params)) and ema.optimization_step == 1


def test_averaged_weights_swaps_in_and_out(tiny_unet_config):
    model = _tiny_unet(tiny_unet_config)
    ema = EMAModel(model.parameters())
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    trained = [param.clone() for param in model.parameters()]
    with averaged_weights(model.parameters(), ema):
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), ema.shadow_params))
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))
    with averaged_weights(model.parameters(), None):
        assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))


def test_image_grid_is_square_ish_and_enlarged():
    images = [Image.new("L", (8, 8), value) for value in range(0, 250, 50)]  # 5 images
    grid = image_grid(images, min_cell=32)
    assert grid.size == (3 * 32, 2 * 32)  # 3 columns, 2 rows, each 8 px cell enlarged 4x
    assert grid.getpixel((32 + 5, 5)) == (50, 50, 50)
    assert grid.getpixel((2 * 32 + 5, 32 + 5)) == (0, 0, 0)  # the filler cell is black


def test_sampling_is_seeded_and_restores_train_mode(tiny_unet_config):
    pipeline = DDIMPipeline(unet=_tiny_unet(tiny_unet_config), scheduler=DDIMScheduler(num_train_timesteps=100))
    pipeline.unet.train()
    state = torch.get_rng_state()
    first = sample_images(pipeline, seed=3, batch_size=2, num_inference_steps=2)
    second = sample_images(pipeline, seed=3, batch_size=2, num_inference_steps=2)
    assert torch.equal(state, torch.get_rng_state()) and pipeline.unet.training
    assert len(first) == 2 and first[0].size == (8, 8)
    assert [image.tobytes() for image in first] == [image.tobytes() for image in second]


def test_log_images_reaches_tensorboard(tmp_path, fresh_accelerate):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
    accelerator.init_trackers("run")
    log_images(accelerator, "samples", [Image.new("L", (8, 8), 255)] * 2, step=7)
    accelerator.end_training()
    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Images("samples")] == [7]


def test_an_earlier_run_in_the_output_dir_is_refused_or_deleted_on_request(tmp_path):
    assert claim_output_dir(tmp_path / "new", resuming=False, overwrite=False) == []
    (tmp_path / "checkpoint-20").mkdir()
    (tmp_path / "checkpoint-20" / "optimizer.bin").write_bytes(b"x")
    (tmp_path / "eval_history.jsonl").write_text('{"step": 10}\n')
    (tmp_path / "samples.png").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"holds an earlier run \(checkpoint-20, eval_history.jsonl\)"):
        claim_output_dir(tmp_path, resuming=False, overwrite=False)
    assert claim_output_dir(tmp_path, resuming=True, overwrite=False) == []
    assert len(claim_output_dir(tmp_path, resuming=False, overwrite=True, delete=False)) == 2  # another process
    assert (tmp_path / "checkpoint-20").is_dir()
    claim_output_dir(tmp_path, resuming=False, overwrite=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["samples.png"]


def test_a_resumed_run_drops_the_evaluations_it_will_repeat(tmp_path):
    history = tmp_path / "eval_history.jsonl"
    history.write_text("".join(json.dumps({"step": step, "fid": 1.0}) + "\n" for step in (5, 10, 15, 20)))
    trim_eval_history(tmp_path, 10)
    assert [json.loads(line)["step"] for line in history.read_text().splitlines()] == [5, 10]
