"""Consistency training from scratch (improved consistency training, Song & Dhariwal 2023, arXiv 2310.14189) in
the parameterisation of diffusers' `CMStochasticIterativeScheduler`, so that a trained `UNet2DModel` samples
with the stock `ConsistencyModelPipeline`.

    recipe = ConsistencyRecipe()                                  # iCT's defaults
    scheduler = recipe.scheduler()                                # what the saved pipeline samples with
    sigma_low, sigma_high = recipe.sample_sigmas(batch_size, step, total_steps, device)
    loss = consistency_loss(model, clean, noise, sigma_low, sigma_high, scheduler, recipe)

The denoiser is the scheduler's own: the UNet sees `x / sqrt(sigma^2 + sigma_data^2)` and the timestep
`250 * log(sigma + 1e-44)`, and `f(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F`, with c_skip and c_out
taken from `scheduler.get_scalings_for_boundary_condition`. One image is paired with ONE noise `z` at two
adjacent levels of the current discretisation, `x + sigma_{n+1} z` (online network) and `x + sigma_n z`
(target: the same network under stop-gradient, with the same dropout mask), and the loss weighs their distance
by `1 / (sigma_{n+1} - sigma_n)`. With Immiscible Diffusion `z` is the assigned noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOSSES = ("pseudo_huber", "l2")
SAMPLER_LEVELS = 40  # noise levels of the saved pipeline's scheduler: at most this many sampler steps


@dataclass
class ConsistencyRecipe:
    """iCT's noise levels, curriculum, level distribution and loss (defaults: the paper's)."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0
    curriculum_start: int = 10  # s0: levels at the start of training
    curriculum_end: int = 1280  # s1: levels at the end (doubling in between)
    p_mean: float = -1.1  # log-normal level distribution
    p_std: float = 2.0
    loss: str = "pseudo_huber"
    huber_c: float | None = None  # None: 0.00054 * sqrt(values per image)

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < --sigma_min < --sigma_max, got {self.sigma_min} and {self.sigma_max}")
        if self.sigma_data <= 0 or self.rho <= 0 or self.p_std <= 0:
            raise ValueError("--sigma_data, --rho and --p_std must be positive")
        if not 1 <= self.curriculum_start <= self.curriculum_end:
            raise ValueError(f"need 1 <= --curriculum_start <= --curriculum_end, got {self.curriculum_start} and "
                             f"{self.curriculum_end}")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss must be one of {LOSSES}, got {self.loss!r}")
        if self.huber_c is not None and self.huber_c <= 0:
            raise ValueError(f"--huber_c must be positive (0 makes the gradient infinite at equal outputs), got "
                             f"{self.huber_c}")

    def scheduler(self, num_train_timesteps: int = SAMPLER_LEVELS):
        """The stock sampler of the saved pipeline, with these noise levels (40 steps: diffusers' default grid
        for multistep sampling; one-step sampling starts at sigma_max whatever it is)."""
        from diffusers import CMStochasticIterativeScheduler

        return CMStochasticIterativeScheduler(num_train_timesteps=num_train_timesteps, sigma_min=self.sigma_min,
                                              sigma_max=self.sigma_max, sigma_data=self.sigma_data, rho=self.rho)

    def two_step_timesteps(self, mid_sigma: float = 0.821) -> list[int]:
        """`timesteps=[...]` of the saved pipeline for two steps through the level nearest `mid_sigma`: iCT's
        CIFAR-10 mid-point, best or level against the grid's default (sigma 2.24) for every method once trained, in
        the MNIST demo and benchmark (docs/sampling.md); worse early in training."""
        scheduler = self.scheduler()
        levels = scheduler.config.num_train_timesteps

        def mid(index: int) -> float:
            scheduler.set_timesteps(timesteps=[index, 0])
            return float(scheduler.sigmas[1])

        return [min(range(1, levels), key=lambda index: abs(math.log(mid(index) / mid_sigma))), 0]

    def num_levels(self, step: int, total_steps: int) -> int:
        """N(k) of iCT's curriculum: s0 levels doubled every K' = floor(K / (log2 floor(s1 / s0) + 1)) steps,
        capped at s1, plus one (N noise levels make N - 1 adjacent pairs)."""
        stages = math.log2(math.floor(self.curriculum_end / self.curriculum_start)) + 1  # iCT: not rounded
        steps_per_stage = max(1, math.floor(total_steps / stages))
        return min(self.curriculum_start * 2 ** (step // steps_per_stage), self.curriculum_end) + 1

    def sigmas(self, num_levels: int) -> torch.Tensor:
        """The Karras noise levels sigma_1 = sigma_min < ... < sigma_N = sigma_max (float64)."""
        ramp = torch.linspace(0, 1, num_levels, dtype=torch.float64)
        low, high = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (low + ramp * (high - low)) ** self.rho

    def level_probabilities(self, sigmas: torch.Tensor) -> torch.Tensor:
        """P(pair n) for the N - 1 adjacent pairs: the log-normal mass between log sigma_n and log sigma_{n+1}."""
        cdf = torch.special.ndtr((sigmas.log() - self.p_mean) / self.p_std)
        mass = cdf[1:] - cdf[:-1]
        return mass / mass.sum()

    def sample_sigmas(self, batch_size: int, step: int, total_steps: int,
                      device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma_n, sigma_{n+1}) for each image, float32 on `device`: pairs drawn from the current
        discretisation with `level_probabilities` (from the global RNG, so a resumed run draws the same)."""
        sigmas = self.sigmas(self.num_levels(step, total_steps))
        index = torch.multinomial(self.level_probabilities(sigmas).float(), batch_size, replacement=True)
        return sigmas[index].float().to(device), sigmas[index + 1].float().to(device)

    def distance_scale(self, sample_shape) -> float:
        """The pseudo-Huber constant c: given, or iCT's 0.00054 * sqrt(d) for d values per image."""
        return self.huber_c if self.huber_c is not None else 0.00054 * math.sqrt(math.prod(sample_shape))


def unet_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """The timestep the stock scheduler gives the UNet for a noise level (`sigma_to_t`, which works in float64;
    MPS has no float64)."""
    if sigma.device.type != "mps":
        sigma = sigma.double()
    return 1000 * 0.25 * torch.log(sigma + 1e-44)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def denoise(model, noisy: torch.Tensor, sigma: torch.Tensor, scheduler, class_labels=None) -> torch.Tensor:
    """The consistency function f(x, sigma) exactly as `ConsistencyModelPipeline` + the scheduler compute it
    (without the final clipping to [-1, 1]); `sigma` holds one level per image."""
    sigma = sigma.to(noisy.device, torch.float32)
    scale = _per_sample(sigma, noisy)
    scaled = noisy / (scale**2 + scheduler.config.sigma_data**2) ** 0.5
    model_output = model(scaled, unet_timestep(sigma), class_labels=class_labels).sample
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition(scale)
    return c_skip * noisy + c_out * model_output.float()


def sample_distance(prediction: torch.Tensor, target: torch.Tensor, loss: str, huber_c: float) -> torch.Tensor:
    """Per-image distance: pseudo-Huber sqrt(||a - b||^2 + c^2) - c, or the mean squared error ("l2")."""
    difference = (prediction.float() - target.float()).flatten(1)
    if loss == "l2":
        return difference.pow(2).mean(dim=1)
    return (difference.pow(2).sum(dim=1) + huber_c**2).sqrt() - huber_c


def same_random_state(device: torch.device):
    """A block after which the RNG of `device` (and the CPU's) is back where it was: the target pass then
    draws the same dropout mask as the online pass that follows."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    index = device.index
    if index is None:  # "cuda" means the current device; MPS has one device and no current_device()
        module = torch.get_device_module(device.type)
        index = module.current_device() if hasattr(module, "current_device") else 0
    return torch.random.fork_rng(devices=[index], device_type=device.type)


def consistency_loss(model, clean: torch.Tensor, noise: torch.Tensor, sigma_low: torch.Tensor,
                     sigma_high: torch.Tensor, scheduler, recipe: ConsistencyRecipe, class_labels=None,
                     target_model=None) -> torch.Tensor:
    """iCT's loss for one batch: `noise` (the assigned noise with Immiscible Diffusion) makes both noisy inputs.

    `target_model` runs the stop-gradient target pass (default `model`; a trainer passes the unwrapped model so
    that no DDP bookkeeping happens for it). Returns the mean over images of
    `distance(f(x + sigma_high z, sigma_high), stopgrad f(x + sigma_low z, sigma_low)) / (sigma_high - sigma_low)`.
    """
    low, high = _per_sample(sigma_low, clean), _per_sample(sigma_high, clean)
    with same_random_state(clean.device), torch.no_grad():
        target_net = model if target_model is None else target_model
        target = denoise(target_net, clean + low * noise, sigma_low, scheduler, class_labels)
    prediction = denoise(model, clean + high * noise, sigma_high, scheduler, class_labels)
    distance = sample_distance(prediction, target, recipe.loss, recipe.distance_scale(clean.shape[1:]))
    return (distance / (sigma_high - sigma_low).float()).mean()
