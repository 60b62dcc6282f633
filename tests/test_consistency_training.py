"""immiscible_pipeline.training.consistency_training: iCT's curriculum, levels and loss, and parity with diffusers'
sampler."""

import contextlib
import math

import pytest
import torch
from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, UNet2DModel

import immiscible_pipeline.training.consistency_training as consistency
from immiscible_pipeline.training.consistency_training import (ConsistencyRecipe, consistency_loss, denoise,
                                                               same_random_state)


@pytest.fixture
def unet(tiny_unet_config):
    torch.manual_seed(0)
    return UNet2DModel.from_config({**tiny_unet_config, "dropout": 0.5})


def test_curriculum_with_an_end_that_is_not_a_power_of_two_times_the_start():
    # iCT: K' = floor(K / (log2 floor(s1 / s0) + 1)) with the log unrounded: 10 -> 1000 over 8000 steps gives
    # K' = floor(8000 / 7.64) = 1046, so the cap of 1000 levels holds from step 7 * 1046 = 7322 on.
    recipe = ConsistencyRecipe(curriculum_start=10, curriculum_end=1000)
    assert [recipe.num_levels(step, 8000) for step in (1045, 1046, 7321, 7322, 7999)] == [11, 21, 641, 1001, 1001]


def test_curriculum_doubles_the_levels_from_10_to_1280_over_training():
    recipe = ConsistencyRecipe()
    # iCT: K' = K / (log2(1280 / 10) + 1) = K / 8 steps per stage; N(k) = min(10 * 2^(k // K'), 1280) + 1.
    assert [recipe.num_levels(step, 400_000) for step in (0, 49_999, 50_000, 100_000, 349_999, 350_000, 399_999)] == [
        11, 11, 21, 41, 641, 1281, 1281]
    assert [recipe.num_levels(step, 80) for step in (0, 9, 10, 79)] == [11, 11, 21, 1281]
    assert recipe.num_levels(0, 3) == 11 and recipe.num_levels(2, 3) > 11  # fewer steps than stages: still grows
    assert ConsistencyRecipe(curriculum_start=20, curriculum_end=20).num_levels(500, 1000) == 21


def test_noise_levels_are_the_schedulers_karras_grid():
    recipe = ConsistencyRecipe()
    sigmas = recipe.sigmas(40)
    assert sigmas[0] == pytest.approx(0.002) and sigmas[-1] == pytest.approx(80.0) and (sigmas.diff() > 0).all()
    scheduler = CMStochasticIterativeScheduler()  # its grid, largest first
    assert torch.allclose(sigmas.flip(0), scheduler.sigmas.double(), rtol=1e-6)


def test_levels_follow_the_log_normal():
    torch.manual_seed(0)
    recipe = ConsistencyRecipe()
    low, high = recipe.sample_sigmas(200_000, step=10**6, total_steps=10**6)  # the final 1281 levels
    assert (high > low).all()
    log_sigma = low.double().log()
    # Truncated to [log 0.002, log 80] = [-2.55, +2.74] standard deviations: mean and spread barely move.
    assert log_sigma.mean().item() == pytest.approx(-1.1, abs=0.05)
    assert log_sigma.std().item() == pytest.approx(2.0, abs=0.1)
    sigmas = recipe.sigmas(11)
    probabilities = recipe.level_probabilities(sigmas)
    # Pair n (sigma_n, sigma_{n+1}) gets the log-normal mass between them, normalised over the 10 pairs.
    from scipy.stats import norm

    mass = [norm.cdf((math.log(b) + 1.1) / 2.0) - norm.cdf((math.log(a) + 1.1) / 2.0)
            for a, b in zip(sigmas[:-1].tolist(), sigmas[1:].tolist())]
    assert probabilities.tolist() == pytest.approx([m / sum(mass) for m in mass], rel=1e-6)


@pytest.mark.parametrize("timestep_index", [0, 22, 38])
def test_denoiser_equals_the_stock_schedulers_step(unet, timestep_index):
    # The scheduler's own route for one level: scale_model_input, the UNet at its timestep, step(); with a
    # single timestep no noise is added, so step() returns the clipped denoised sample.
    unet.eval()
    scheduler = ConsistencyRecipe().scheduler()
    scheduler.set_timesteps(timesteps=[timestep_index])
    timestep, sigma = scheduler.timesteps[0], scheduler.sigmas[0]
    noisy = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * sigma
    with torch.no_grad():
        output = unet(scheduler.scale_model_input(noisy, timestep), timestep).sample
        expected = scheduler.step(output, timestep, noisy).prev_sample
        ours = denoise(unet, noisy, sigma.expand(3), scheduler).clamp(-1, 1)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()


def test_one_step_pipeline_samples_the_denoiser_at_sigma_max(unet):
    unet.eval()
    scheduler = ConsistencyRecipe().scheduler()
    pipeline = ConsistencyModelPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    images = pipeline(batch_size=2, num_inference_steps=1, latents=noise.clone(), output_type="np").images
    with torch.no_grad():
        ours = denoise(unet, noise * 80.0, torch.full((2,), 80.0), scheduler).clamp(-1, 1)
    assert torch.allclose(torch.from_numpy(images).permute(0, 3, 1, 2), ours / 2 + 0.5, atol=1e-5)


def test_both_branches_see_the_same_noise_and_dropout_and_only_the_upper_one_trains(unet, monkeypatch):
    unet.train()
    recipe, scheduler = ConsistencyRecipe(), ConsistencyRecipe().scheduler()
    clean = torch.rand(4, 3, 8, 8) * 2 - 1
    noise = torch.randn(4, 3, 8, 8)
    seen, outputs = [], []
    real_denoise, real_distance = consistency.denoise, consistency.sample_distance

    def spy_denoise(model, noisy, sigma, *args, **kwargs):
        seen.append(((noisy - clean) / sigma.reshape(-1, 1, 1, 1), torch.is_grad_enabled()))
        return real_denoise(model, noisy, sigma, *args, **kwargs)

    def spy_distance(prediction, target, *args):
        outputs.append((prediction, target))
        return real_distance(prediction, target, *args)

    monkeypatch.setattr(consistency, "denoise", spy_denoise)
    monkeypatch.setattr(consistency, "sample_distance", spy_distance)
    low, high = torch.tensor([0.1, 0.5, 1.0, 2.0]), torch.tensor([0.2, 0.7, 1.5, 3.0])
    loss = consistency_loss(unet, clean, noise, low, high, scheduler, recipe)
    (target_noise, target_grad), (online_noise, online_grad) = seen
    assert torch.allclose(target_noise, noise, atol=1e-5) and torch.allclose(online_noise, noise, atol=1e-5)
    assert not target_grad and online_grad  # the target is under stop-gradient
    loss.backward()
    assert all(param.grad is not None for param in unet.parameters() if param.requires_grad)

    # Equal levels: identical inputs; with dropout 0.5 the outputs agree only if both passes drew the same mask.
    outputs.clear()
    consistency_loss(unet, clean, noise, high, high, scheduler, recipe)
    prediction, target = outputs[0]
    assert torch.equal(prediction.detach(), target)


def test_loss_is_the_weighted_distance_of_the_two_passes(unet):
    unet.eval()  # no dropout: the two passes can be recomputed by hand
    recipe, scheduler = ConsistencyRecipe(), ConsistencyRecipe().scheduler()
    clean, noise = torch.rand(3, 3, 8, 8) * 2 - 1, torch.randn(3, 3, 8, 8)
    low, high = torch.tensor([0.01, 0.3, 5.0]), torch.tensor([0.02, 0.5, 9.0])
    with torch.no_grad():
        online = denoise(unet, clean + high.reshape(-1, 1, 1, 1) * noise, high, scheduler)
        target = denoise(unet, clean + low.reshape(-1, 1, 1, 1) * noise, low, scheduler)
    c = 0.00054 * math.sqrt(3 * 8 * 8)
    by_hand = (((online - target).flatten(1).pow(2).sum(1) + c**2).sqrt() - c) / (high - low)
    loss = consistency_loss(unet, clean, noise, low, high, scheduler, recipe)
    assert loss.item() == pytest.approx(by_hand.mean().item(), rel=1e-5)


def test_same_random_state_forks_the_rng_of_the_device_at_hand(monkeypatch):
    forked = []

    def record(devices, device_type="cuda"):
        forked.append((devices, device_type))
        return contextlib.nullcontext()

    monkeypatch.setattr(torch.random, "fork_rng", record)
    same_random_state(torch.device("cpu"))
    same_random_state(torch.device("mps"))  # one device and no current_device(): index 0
    same_random_state(torch.device("cuda", 1))
    assert forked == [([], "cuda"), ([0], "mps"), ([1], "cuda")]


def test_same_random_state_replays_dropout(unet):
    unet.train()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0])
    with same_random_state(x.device):
        first = unet(x, t).sample
    assert torch.equal(unet(x, t).sample, first)
    assert not torch.equal(unet(x, t).sample, first)  # without it, a new mask


def test_loss_weights_and_distances():
    recipe = ConsistencyRecipe()
    assert recipe.distance_scale((3, 32, 32)) == pytest.approx(0.00054 * math.sqrt(3072))  # iCT's c on CIFAR-10
    a, b = torch.zeros(2, 4), torch.tensor([[3.0, 4.0, 0, 0], [0, 0, 0, 0]])
    assert consistency.sample_distance(a, b, "pseudo_huber", 1.0).tolist() == pytest.approx([math.sqrt(26) - 1, 0.0])
    assert consistency.sample_distance(a, b, "l2", 1.0).tolist() == pytest.approx([25 / 4, 0.0])


@pytest.mark.parametrize("settings, message", [
    ({"sigma_min": 0.0}, "need 0 < --sigma_min < --sigma_max"),
    ({"sigma_min": 90.0}, "need 0 < --sigma_min < --sigma_max"),
    ({"curriculum_start": 100, "curriculum_end": 10}, "--curriculum_start <= --curriculum_end"),
    ({"loss": "l1"}, "--loss must be one of"),
    ({"p_std": 0.0}, "must be positive"),
    ({"huber_c": 0.0}, "--huber_c must be positive"),
])
def test_bad_recipes_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        ConsistencyRecipe(**settings)


def test_two_step_timesteps_pass_through_the_level_nearest_the_asked_sigma():
    recipe = ConsistencyRecipe()
    timesteps = recipe.two_step_timesteps()
    scheduler = recipe.scheduler()
    scheduler.set_timesteps(timesteps=timesteps)
    assert timesteps == [24, 0] and abs(float(scheduler.sigmas[1]) - 0.823) < 1e-3  # iCT's 0.821, on our grid
    higher = recipe.two_step_timesteps(mid_sigma=2.24)
    scheduler.set_timesteps(timesteps=higher)
    assert abs(float(scheduler.sigmas[1]) - 2.24) < 0.01  # the grid's own two-step level
