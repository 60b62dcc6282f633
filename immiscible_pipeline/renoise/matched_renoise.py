"""Stochastic sampling that keeps the training's coupling: every noise a sampler injects after its first draw is
paired with the current clean estimate the way training paired noise with images.

    pipeline = DiffusionPipeline.from_pretrained(folder)
    matched_renoise(pipeline)                  # reads folder/immiscible_coupling.json
    images = pipeline(num_inference_steps=2).images      # the stock call, unchanged

Why: an assignment-trained model learned `x0 + sigma z` with `z` assigned to `x0`. A re-noising sampler (DDPM,
DDIM with eta > 0, Euler ancestral, multistep consistency sampling) feeds it `x0_hat + sigma z` with an
independent `z`, inputs of a kind it never saw. Here the scheduler's own `step` runs unchanged, except that the
noise it draws is replaced: for linear assignment, the fresh batch of noise is assigned to the batch of clean
estimates in groups of the training's group size (a short group is padded with extra draws rather than
assigned alone); for KNN, each clean estimate keeps the nearest of k fresh draws; for "none", the draw is left
as it is, so the images are the stock pipeline's. The scheduler object keeps its class and config: a pipeline
saved afterwards still loads with plain diffusers.

Deterministic samplers (DDIM with eta 0, Euler, Heun, DPM-Solver++, flow-matching Euler, one-step consistency
sampling) inject no noise after their first draw and need nothing; the first draw (x_T) is plain N(0, I) as in
training's marginal.
"""

from __future__ import annotations

import functools
import logging
import sys
from contextlib import contextmanager

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .coupling_record import TrainingCoupling

logger = logging.getLogger(__name__)

RENOISING = ("DDPMScheduler", "DDIMScheduler", "EulerAncestralDiscreteScheduler", "CMStochasticIterativeScheduler")
DETERMINISTIC = ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "FlowMatchEulerDiscreteScheduler",
                 "FlowMatchHeunDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                 "DEISMultistepScheduler", "UniPCMultistepScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
                 "KDPM2DiscreteScheduler")
_INSTALLED = "_immiscible_stock_step"
# Couple the first 5 re-noisings of a sampling run, not all: each coupled re-noising pulls the state towards the
# current estimate, and over 50 DDPM steps the pulls compound (FID 3.95 against 1.94 independent on the linear
# DDIM demo; first 5: 1.23). First 5 was best or near best at 10 and 50 steps, linear and KNN (docs/sampling.md).
DEFAULT_MATCHED_STEPS = 5


def injects_noise(scheduler, eta: float = 0.0, num_inference_steps: int | None = None) -> bool:
    """Whether sampling with `scheduler` draws noise after its first draw (for a consistency model: more than
    one step; for DDIM: eta > 0)."""
    name = type(scheduler).__name__
    if name == "DDIMScheduler":
        return eta > 0
    if name == "CMStochasticIterativeScheduler":
        return num_inference_steps is None or num_inference_steps > 1
    if name in RENOISING:
        return True
    if name == "DPMSolverMultistepScheduler":
        return scheduler.config.algorithm_type.startswith("sde")
    if name == "FlowMatchEulerDiscreteScheduler":
        return bool(scheduler.config.get("stochastic_sampling", False))
    return name not in DETERMINISTIC  # unknown: assume it may


def check_supported(scheduler) -> None:
    """Raises for a scheduler that re-noises in a way this module cannot couple."""
    name = type(scheduler).__name__
    if name in RENOISING or (name in DETERMINISTIC and not injects_noise(scheduler)):
        return
    raise ValueError(f"matched re-noising supports {', '.join(RENOISING)} (re-noising) and the deterministic "
                     f"{', '.join(DETERMINISTIC)}; {name}{' as configured' if name in DETERMINISTIC else ''} "
                     "re-noises in a way it cannot couple. Sample with a deterministic scheduler instead, e.g. "
                     "DDIMScheduler with eta 0.")


class CoupledNoise:
    """Turns a sampler's fresh noise into noise coupled to the clean estimates, as `coupling` paired at training.

    matched_steps: couple only the first this many re-noisings of each sampling run (None: all of them).
    """

    def __init__(self, coupling: TrainingCoupling, matched_steps: int | None = None):
        if matched_steps is not None and matched_steps < 0:
            raise ValueError(f"matched_steps must be >= 0 or None, got {matched_steps}")
        self.coupling, self.matched_steps = coupling, matched_steps
        self.renoisings = 0  # in the current sampling run

    def __call__(self, clean: torch.Tensor, fresh: torch.Tensor, draw) -> torch.Tensor:
        """`fresh`: the noise the sampler drew; `draw()`: another batch like it from the same generators."""
        self.renoisings += 1
        if self.matched_steps is not None and self.renoisings > self.matched_steps:
            return fresh
        if self.coupling.method == "knn" and self.coupling.k > 1:
            return nearest_of_k(clean, fresh, [draw() for _ in range(self.coupling.k - 1)])
        if self.coupling.method == "linear" and self.coupling.group_size > 1:
            return assigned_in_groups(clean, fresh, self.coupling.group_size, draw)
        return fresh


def nearest_of_k(clean: torch.Tensor, first: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
    """For each sample, the candidate (`first` or one of `others`) nearest to its clean estimate in L2."""
    candidates = torch.stack([first, *others])  # [k, B, ...]
    flat = candidates.reshape(candidates.shape[0], candidates.shape[1], -1).float()
    distances = (flat - clean.reshape(1, clean.shape[0], -1).float()).norm(dim=2)  # [k, B]
    best = distances.argmin(dim=0)
    return candidates[best, torch.arange(candidates.shape[1], device=best.device)]


def assigned_in_groups(clean: torch.Tensor, fresh: torch.Tensor, group_size: int, draw) -> torch.Tensor:
    """Consecutive groups of `group_size` samples, each given the minimum total-L2 assignment of its noise; a
    short last group picks its noises among `group_size` draws (its own plus extra ones) instead of being paired
    alone or in a small group, which would couple it less than training did."""
    batch = clean.shape[0]
    short = batch % group_size
    extra = None
    if short and batch > 0:
        needed, pool = group_size - short, []
        while sum(len(p) for p in pool) < needed:
            pool.append(draw())
        extra = torch.cat(pool)[:needed]
    out = torch.empty_like(fresh)
    for start in range(0, batch, group_size):
        stop = min(start + group_size, batch)
        noises = fresh[start:stop]
        if stop - start < group_size:
            noises = torch.cat([noises, extra])  # the short group's pool
        cost = torch.cdist(clean[start:stop].reshape(stop - start, -1).double().cpu(),
                           noises.reshape(noises.shape[0], -1).double().cpu())
        rows, cols = linear_sum_assignment(cost.numpy())
        out[start:stop][torch.from_numpy(rows)] = noises[torch.from_numpy(cols.astype(np.int64)).to(noises.device)]
    return out


@contextmanager
def _replaced_randn(module_name: str, replacement):
    """Within the block the scheduler's module draws its noise with `replacement` (diffusers' schedulers call
    `randn_tensor` from their module's namespace)."""
    module = sys.modules[module_name]
    stock = module.randn_tensor
    module.randn_tensor = replacement
    try:
        yield stock
    finally:
        module.randn_tensor = stock


def _clean_estimate(output) -> torch.Tensor:
    """The step's clean estimate: `pred_original_sample` where the scheduler returns it; a consistency step run
    with zero noise returns the denoised sample itself."""
    if isinstance(output, tuple):
        return output[1] if len(output) > 1 else output[0]
    estimate = getattr(output, "pred_original_sample", None)
    return estimate if estimate is not None else output.prev_sample


def _coupled_step(scheduler, stock_step):
    module_name = type(scheduler).__module__

    @functools.wraps(stock_step)
    def step(model_output, timestep, sample, *args, **kwargs):
        # 1. The step with zero noise: the clean estimate, and the draw the sampler makes (if any).
        drawn = []

        def zeros(shape, **draw_kwargs):
            drawn.append((shape, draw_kwargs))
            return torch.zeros(shape, dtype=draw_kwargs.get("dtype"), device=draw_kwargs.get("device"))

        step_index = getattr(scheduler, "_step_index", None)
        with _replaced_randn(module_name, zeros) as stock_randn:
            probe = stock_step(model_output, timestep, sample, *args, **kwargs)
        if not drawn:
            return probe  # this step injects no noise
        if hasattr(scheduler, "_step_index"):
            scheduler._step_index = step_index  # the probe advanced it
        # 2. The sampler's own draw, coupled to the clean estimate, fed to the same step.
        shape, draw_kwargs = drawn[0]
        fresh = stock_randn(shape, **draw_kwargs)
        noise = scheduler.coupled_noise(_clean_estimate(probe), fresh, lambda: stock_randn(shape, **draw_kwargs))
        with _replaced_randn(module_name, lambda *_, **__: noise):
            return stock_step(model_output, timestep, sample, *args, **kwargs)

    return step


def _counting_set_timesteps(scheduler, stock_set_timesteps):
    @functools.wraps(stock_set_timesteps)
    def set_timesteps(*args, **kwargs):
        scheduler.coupled_noise.renoisings = 0  # a new sampling run
        return stock_set_timesteps(*args, **kwargs)

    return set_timesteps


def matched_renoise(pipeline, coupling: TrainingCoupling | str | None = None,
                    matched_steps: int | None = DEFAULT_MATCHED_STEPS):
    """Makes `pipeline`'s scheduler re-noise with the training's coupling; returns the pipeline.

    coupling: the record (or a folder / repo id holding one); None reads it from the folder the pipeline was
        loaded from. A pipeline without a record, or one trained with independent noise, is left as it is.
    matched_steps: couple only the first this many re-noisings of each sampling run (default 5, measured;
        None: all of them). A consistency model's 2- or 4-step sampler re-noises 1 or 3 times: all coupled.
    """
    independent_renoise(pipeline)
    if coupling is None or isinstance(coupling, str):
        source = coupling or pipeline.name_or_path
        coupling = TrainingCoupling.load(source) if source else None
    if coupling is None or not coupling.is_coupled:
        return pipeline
    scheduler = pipeline.scheduler
    check_supported(scheduler)
    if type(scheduler).__name__ not in RENOISING:
        return pipeline  # deterministic: nothing to couple
    stock = {"step": scheduler.step, "set_timesteps": scheduler.set_timesteps}
    scheduler.coupled_noise = CoupledNoise(coupling, matched_steps)  # looked up at each step
    scheduler.step = _coupled_step(scheduler, stock["step"])
    scheduler.set_timesteps = _counting_set_timesteps(scheduler, stock["set_timesteps"])
    setattr(scheduler, _INSTALLED, stock)
    return pipeline


def independent_renoise(pipeline):
    """Undoes `matched_renoise`: the scheduler draws its noise as stock diffusers does."""
    scheduler = pipeline.scheduler
    stock = getattr(scheduler, _INSTALLED, None)
    if stock is not None:
        del scheduler.step, scheduler.set_timesteps, scheduler.coupled_noise  # back to the class's methods
        delattr(scheduler, _INSTALLED)
    return pipeline


def is_matched(pipeline) -> bool:
    return getattr(pipeline.scheduler, _INSTALLED, None) is not None


def warn_if_independent(coupling: TrainingCoupling | None, scheduler, renoise: str, eta: float = 0.0,
                        num_inference_steps: int | None = None, warned: set | None = None) -> bool:
    """Logs (once per `warned` set) that an assignment-trained model is being sampled with independent
    re-noising; returns whether that is the case."""
    mismatched = (renoise == "independent" and coupling is not None and coupling.is_coupled
                  and injects_noise(scheduler, eta, num_inference_steps))
    key = (type(scheduler).__name__, coupling.method if coupling else None)
    if mismatched and (warned is None or key not in warned):
        logger.warning(f"This model was trained with {coupling.describe()}, and {type(scheduler).__name__} "
                       "re-noises between steps with independent noise, which the model never saw in training. "
                       "Use matched re-noising (--renoise matched; in Python, "
                       "immiscible_pipeline.matched_renoise(pipeline)) or a deterministic sampler.")
        if warned is not None:
            warned.add(key)
    return mismatched
