"""What the pixel trainers differ in: the loss a batch of images and its (assigned) noise make, and the stock
pipeline that samples the trained UNet. The trainers and the convergence benchmark call these same objects,
so the benchmark measures the trainers' own training step.

    objective = FlowObjective(weighting_scheme="logit_normal")       # or DiffusionObjective, ConsistencyObjective
    noise = immiscible(clean)                                        # Immiscible Diffusion: the assigned noise
    loss = objective.loss(model, clean, noise, step, total_steps)    # step: optimisation steps done so far
    pipeline = objective.pipeline(unet)                              # DDIMPipeline, ConsistencyModelPipeline, ...

Every objective draws its timesteps (or noise levels) from the global torch RNG after the noise, in the same
order in every caller, so a run repeats exactly from its seed.
"""

from __future__ import annotations

import torch

from .consistency_training import ConsistencyRecipe, consistency_loss
from .flow_matching import flow_matching_loss, interpolate, sample_timesteps
from .losses import min_snr_loss

# --weighting_scheme: diffusers' flow-matching names (compute_density_for_timestep_sampling and
# compute_loss_weighting_for_sd3), with "uniform" accepted for diffusers' "none" (uniform timesteps, unweighted).
PIXEL_FLOW_WEIGHTING = ("logit_normal", "mode", "uniform", "none", "sigma_sqrt", "cosmap")


class DiffusionObjective:
    """train_immiscible_ddim.py: `add_noise` at uniform timesteps of a DDPM schedule, the (min-SNR weighted)
    loss of the schedule's prediction type built from the assigned noise; sampled by deterministic DDIM."""

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                 prediction_type: str = "epsilon", snr_gamma: float | None = None):
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                             prediction_type=prediction_type)
        self.snr_gamma = snr_gamma

    def loss(self, model, clean: torch.Tensor, noise: torch.Tensor, step: int, total_steps: int,
             class_labels=None) -> torch.Tensor:
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (clean.shape[0],),
                                  device=clean.device)
        noisy = self.noise_scheduler.add_noise(clean, noise, timesteps)
        prediction = model(noisy, timesteps, class_labels=class_labels).sample
        return min_snr_loss(self.noise_scheduler, prediction, clean, noise, timesteps, self.snr_gamma)

    def pipeline(self, unet):
        from diffusers import DDIMPipeline, DDIMScheduler

        return DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(self.noise_scheduler.config))


class ConsistencyObjective:
    """train_immiscible_cm.py: improved consistency training (one noise at two adjacent levels of the
    curriculum's current discretisation, stop-gradient target); sampled by the stock ConsistencyModelPipeline.
    `unwrap` gives the model for the target pass (the trainers pass `accelerator.unwrap_model`, so that DDP does
    no bookkeeping for it)."""

    def __init__(self, recipe: ConsistencyRecipe | None = None, unwrap=None):
        self.recipe = recipe or ConsistencyRecipe()
        self.scheduler = self.recipe.scheduler()  # its scalings at training are the saved pipeline's at sampling
        self.unwrap = unwrap or (lambda model: model)

    def loss(self, model, clean: torch.Tensor, noise: torch.Tensor, step: int, total_steps: int,
             class_labels=None) -> torch.Tensor:
        sigma_low, sigma_high = self.recipe.sample_sigmas(clean.shape[0], step, total_steps, clean.device)
        return consistency_loss(model, clean, noise, sigma_low, sigma_high, self.scheduler, self.recipe,
                                class_labels, target_model=self.unwrap(model))

    def pipeline(self, unet):
        from diffusers import ConsistencyModelPipeline

        return ConsistencyModelPipeline(unet=unet, scheduler=self.recipe.scheduler())


class FlowObjective:
    """train_immiscible_flow.py: rectified flow in pixel space. `x_t = (1 - s) x0 + s z` at a level `s` drawn
    by diffusers' timestep density (`weighting_scheme`), the UNet sees the timestep `1000 s` and predicts the
    velocity `z - x0` of the assigned noise `z`; sampled by a stock `DDPMPipeline` whose scheduler is
    `FlowMatchEulerDiscreteScheduler` (Euler steps from s = 1 to 0, starting from N(0, I))."""

    def __init__(self, weighting_scheme: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, num_train_timesteps: int = 1000, shift: float = 1.0):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if weighting_scheme not in PIXEL_FLOW_WEIGHTING:
            raise ValueError(f"--weighting_scheme must be one of {', '.join(PIXEL_FLOW_WEIGHTING)}, "
                             f"got {weighting_scheme!r}")
        self.weighting_scheme = "none" if weighting_scheme == "uniform" else weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)

    def loss(self, model, clean: torch.Tensor, noise: torch.Tensor, step: int, total_steps: int,
             class_labels=None) -> torch.Tensor:
        timesteps, sigmas = sample_timesteps(self.scheduler, clean.shape[0], self.weighting_scheme, self.logit_mean,
                                             self.logit_std, self.mode_scale, device=clean.device)
        noisy = interpolate(clean, noise, sigmas)
        velocity = model(noisy, timesteps, class_labels=class_labels).sample
        return flow_matching_loss(velocity, clean, noise, noisy, sigmas, self.weighting_scheme)

    def pipeline(self, unet):
        from diffusers import DDPMPipeline, FlowMatchEulerDiscreteScheduler

        return DDPMPipeline(unet=unet, scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config))
