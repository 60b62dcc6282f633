"""The method itself: noise re-paired with its batch before diffusion. Tensors in, tensors out; nothing here
knows of files, argparse or training loops (Accelerate only as the optional collective of the global batch).

- `immiscible_noise`: `ImmiscibleNoise`, the one call a training loop makes, and its statistics.
- `linear_assignment`: the exact assignment (the NeurIPS 2024 paper): the distance matrix and the solvers.
- `nearest_of_k`: KNN (the follow-up): each sample keeps the nearest of k noises.
- `global_batch`: linear assignment over the batches of all processes together.
"""

from .global_batch import build_immiscible, GlobalImmiscibleNoise
from .immiscible_noise import AssignmentStats, ImmiscibleNoise
from .linear_assignment import assignment_permutation, pairwise_l2, solve_assignment
from .nearest_of_k import knn_noise, knn_noise_reference

__all__ = ["AssignmentStats", "GlobalImmiscibleNoise", "ImmiscibleNoise", "assignment_permutation",
           "build_immiscible", "knn_noise", "knn_noise_reference", "pairwise_l2", "solve_assignment"]
