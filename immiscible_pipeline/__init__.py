"""Immiscible Diffusion for diffusers training loops: noise re-paired with its batch before diffusion."""

from .assignment import AssignmentStats, ImmiscibleNoise
from .distributed import GlobalImmiscibleNoise, build_immiscible
from .knn import knn_noise, knn_noise_reference
from .linear_assignment import assignment_permutation, pairwise_l2, solve_assignment

__all__ = [
    "AssignmentStats",
    "GlobalImmiscibleNoise",
    "ImmiscibleNoise",
    "build_immiscible",
    "assignment_permutation",
    "knn_noise",
    "knn_noise_reference",
    "pairwise_l2",
    "solve_assignment",
]
__version__ = "0.1.0"
