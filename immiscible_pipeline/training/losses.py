"""The diffusion losses: the target the model learns for the scheduler's prediction type, from the noise that
was actually added (with Immiscible Diffusion: the assigned noise), and Min-SNR weighting."""

from __future__ import annotations

import torch
import torch.nn.functional as F


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def training_target(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict, by the scheduler's `prediction_type`: the noise that was added
    ("epsilon"), the velocity built from it ("v_prediction"), or the clean sample ("sample").

    `noise` must be the noise actually added to `clean` (with Immiscible Diffusion: the assigned noise)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    if prediction_type == "sample":
        return clean
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def diffusion_loss(scheduler, model_pred: torch.Tensor, clean: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the model's prediction and `training_target`, computed in float32."""
    return F.mse_loss(model_pred.float(), training_target(scheduler, clean, noise, timesteps).float())


def min_snr_loss(scheduler, model_pred: torch.Tensor, clean: torch.Tensor, noise: torch.Tensor,
                 timesteps: torch.Tensor, snr_gamma: float | None = None) -> torch.Tensor:
    """`diffusion_loss`, or with `snr_gamma` the min-SNR-gamma weighted loss (arXiv 2303.09556):
    each sample's MSE weighted by min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v-prediction, and
    min(SNR, gamma) for predicting the sample, with diffusers' `compute_snr`."""
    if snr_gamma is None:
        return diffusion_loss(scheduler, model_pred, clean, noise, timesteps)
    if snr_gamma <= 0:
        raise ValueError(f"snr_gamma must be positive (None for no weighting), got {snr_gamma}: min(SNR, gamma) "
                         "would weight every sample by 0 or less")
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps).float()
    weights = snr.clamp(max=snr_gamma)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        weights = weights / snr
    elif prediction_type == "v_prediction":
        weights = weights / (snr + 1)
    target = training_target(scheduler, clean, noise, timesteps)
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    return (per_sample * weights.to(per_sample.device)).mean()
