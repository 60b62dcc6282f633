"""Sampling that keeps the training's coupling (what a re-noising sampler must do for an assignment-trained
model). Knows diffusers' schedulers; nothing of Accelerate, argparse or training loops.

- `coupling_record`: `TrainingCoupling`, what a trainer saves beside its pipeline (immiscible_coupling.json).
- `matched_renoise`: `matched_renoise(pipeline)`, the scheduler's injected noise coupled to its clean estimates.
"""

from .coupling_record import COUPLING_FILE, TrainingCoupling, coupling_of_run
from .matched_renoise import (DEFAULT_MATCHED_STEPS, independent_renoise, injects_noise, is_matched, matched_renoise,
                              warn_if_independent)

__all__ = ["COUPLING_FILE", "DEFAULT_MATCHED_STEPS", "TrainingCoupling", "coupling_of_run", "independent_renoise",
           "injects_noise", "is_matched", "matched_renoise", "warn_if_independent"]
