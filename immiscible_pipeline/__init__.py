"""Immiscible Diffusion for diffusers training loops: noise re-paired with its batch before diffusion."""

from .assignment import AssignmentStats, ImmiscibleNoise
from .knn import knn_noise, knn_noise_reference
from .linear_assignment import assignment_permutation, pairwise_l2, solve_assignment

__all__ = [
    "AssignmentStats",
    "ImmiscibleNoise",
    "assignment_permutation",
    "knn_noise",
    "knn_noise_reference",
    "pairwise_l2",
    "solve_assignment",
]
__version__ = "0.1.0"
