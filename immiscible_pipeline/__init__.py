"""Immiscible Diffusion for diffusers training loops: noise re-paired with its batch before diffusion.

    from immiscible_pipeline import ImmiscibleNoise
    immiscible = ImmiscibleNoise(method="linear")        # or method="knn", k=4
    noise = immiscible(clean_images)                     # instead of torch.randn_like(clean_images)

The library's parts: `noise/` (the method), `renoise/` (stochastic sampling that keeps the training's
coupling: `matched_renoise(pipeline)`), `training/` (what the trainer scripts stand on) and `evaluation/` (FID,
KID and classifier confidence of samples; `python -m immiscible_pipeline.evaluate`).
"""

from .noise import (AssignmentStats, GlobalImmiscibleNoise, ImmiscibleNoise, assignment_permutation,
                    build_immiscible, knn_noise, knn_noise_reference, pairwise_l2, solve_assignment)
from .renoise import TrainingCoupling, independent_renoise, matched_renoise

__all__ = ["AssignmentStats", "GlobalImmiscibleNoise", "ImmiscibleNoise", "assignment_permutation",
           "build_immiscible", "independent_renoise", "knn_noise", "knn_noise_reference", "matched_renoise",
           "pairwise_l2", "solve_assignment", "TrainingCoupling"]
__version__ = "0.1.0"
