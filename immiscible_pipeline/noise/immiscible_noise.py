"""`ImmiscibleNoise`: one call that gives a training loop noise re-paired with its batch.

    imm = ImmiscibleNoise(method="linear")
    noise = imm(latents)                    # instead of torch.randn_like(latents)

Tensors in, tensors out: no files, no Accelerate (see `global_batch.py` for the global batch).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from .linear_assignment import COST_DTYPE_CHOICES, SOLVERS, assignment_permutation, pairwise_l2, resolve_cost_dtype
from .nearest_of_k import knn_noise, knn_noise_reference

METHODS = ("none", "linear", "knn")
KNN_SAMPLERS = ("fast", "reference")


@dataclass
class AssignmentStats:
    """What the last call did. Distances are mean L2 between x0_i and its noise, per sample."""

    method: str
    batch_size: int
    mean_distance_before: float
    mean_distance_after: float
    relative_reduction: float  # 1 - after / before
    time_ms: float
    noop: bool = False  # True when nothing could be re-paired (linear with B = 1 or all groups singletons)

    def as_dict(self, prefix: str = "immiscible/") -> dict:
        """Numbers only, ready for `accelerator.log`."""
        return {f"{prefix}{key}": float(value) for key, value in asdict(self).items() if key != "method"}


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite. A sum is NaN or inf when any value is, so one reduction decides; only a
    non-finite sum (or an overflowing one) looks at every value. `isfinite(x).all()` alone builds a [B, D] mask:
    30 ms at B = 1024, D = 4096 on a CPU, as long as the rest of the assignment."""
    total = tensor.sum(dtype=torch.float32) if tensor.dtype in (torch.float16, torch.bfloat16) else tensor.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not is_finite(tensor):
        raise ValueError(f"{name} contains NaN or inf values")


def row_distances(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """||x0_i - noise_i||_2 for each sample, in float32. On a CPU in blocks of rows whose difference (1 MB) is
    reused from the cache: half the time of one [B, D] difference (fresh memory, page faults) at B = 1024."""
    x, n = x0.reshape(x0.shape[0], -1), noise.reshape(noise.shape[0], -1)
    if x.device.type != "cpu":
        return (x.float() - n.float()).norm(dim=1)
    rows = max(1, 2**18 // max(x.shape[1], 1))
    out = torch.empty(x.shape[0], dtype=torch.float32)
    block = torch.empty(min(rows, x.shape[0]), x.shape[1], dtype=torch.float32)
    for start in range(0, x.shape[0], rows):
        end = min(start + rows, x.shape[0])
        diff = torch.sub(x[start:end].float(), n[start:end].float(), out=block[:end - start])
        torch.linalg.vector_norm(diff, dim=1, out=out[start:end])
    return out


def draw_noise(x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """N(0, I) shaped like x0 (its dtype and device), drawn on the generator's device if one is given."""
    dev = generator.device if generator is not None else x0.device
    return torch.randn(x0.shape, generator=generator, device=dev, dtype=torch.float32).to(x0.device, x0.dtype)


def can_repair(batch_size: int, labels: torch.Tensor | None) -> bool:
    """Whether any two samples may swap noise: B > 1, and with groups, some group of two or more."""
    if labels is None:
        return batch_size > 1
    return bool((torch.unique(labels, return_counts=True)[1] > 1).any())


def as_group_tensor(groups, batch_size: int) -> torch.Tensor:
    """Labels of any kind (tensor, ints, strings) as a CPU int64 tensor of length `batch_size`."""
    if isinstance(groups, torch.Tensor):
        labels = groups.detach().cpu().reshape(-1) if groups.dim() <= 1 else groups.detach().cpu()
        if labels.dim() != 1:
            raise ValueError(f"groups must be one label per sample (1-D), got shape {tuple(groups.shape)}")
    else:
        groups = list(groups)
        codes = {label: i for i, label in enumerate(dict.fromkeys(groups))}
        labels = torch.tensor([codes[label] for label in groups], dtype=torch.int64)
    if labels.numel() != batch_size:
        raise ValueError(f"groups has {labels.numel()} labels but the batch has {batch_size} samples")
    return labels


class ImmiscibleNoise:
    """Noise for a diffusion training batch, assigned to the batch as in Immiscible Diffusion.

    Args:
        method: "linear" (exact minimum total L2 pairing of the batch with its noise, NeurIPS 2024),
            "knn" (each sample keeps the nearest of `k` fresh noises, the follow-up paper) or "none" (plain
            independent noise, for baselines).
        k: candidates per sample for "knn".
        cost_dtype: dtype of the x.n product in the linear cost: "auto" (default: bfloat16 on GPUs and CPUs
            with fast bf16, float32 elsewhere), "float32" (exact), "bfloat16" or "float16" (the paper's
            quantized assignment); the norms stay float32, which keeps the optimum in practice.
        solver: "auto" (the fastest installed: lapcpp, else lap, else scipy), "lapcpp", "lap" or "scipy"; all
            give the exact optimum.
        knn_sampler: "fast" draws the winner exactly in law from scalars; "reference" draws all k candidates.

    Linear assignment only permutes the batch of noise, so the noise stays exactly N(0, I). KNN noise does
    not: the kept noise is pulled towards the data and its energy shrinks slightly (more so for small D).
    Groups (class labels) restrict linear assignment to equal labels; KNN pairs each sample on its own, so
    groups change nothing for it.
    """

    def __init__(self, method: str = "linear", k: int = 8, cost_dtype: str = "auto", solver: str = "auto",
                 knn_sampler: str = "fast"):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if cost_dtype not in COST_DTYPE_CHOICES:
            raise ValueError(f"cost_dtype must be one of {COST_DTYPE_CHOICES}, got {cost_dtype!r}")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if knn_sampler not in KNN_SAMPLERS:
            raise ValueError(f"knn_sampler must be one of {KNN_SAMPLERS}, got {knn_sampler!r}")
        self.method, self.k, self.cost_dtype, self.solver, self.knn_sampler = method, k, cost_dtype, solver, knn_sampler
        self.last_stats: AssignmentStats | None = None

    def __repr__(self) -> str:
        extra = f", k={self.k}" if self.method == "knn" else f", cost_dtype={self.cost_dtype!r}"
        return f"ImmiscibleNoise(method={self.method!r}{extra})"

    def __call__(self, x0: torch.Tensor, generator: torch.Generator | None = None,
                 groups: torch.Tensor | Sequence | None = None) -> torch.Tensor:
        """Fresh N(0, I) noise shaped like x0 (same dtype and device), assigned to x0.

        With a `generator`, noise is drawn on the generator's device and moved to x0's device.
        """
        self._validate(x0, groups=groups)
        if self.method != "knn":
            return self._assign(x0, draw_noise(x0, generator), groups)  # fresh noise needs no finiteness check
        start = time.perf_counter()
        sampler = knn_noise if self.knn_sampler == "fast" else knn_noise_reference
        noise, before, after = sampler(x0, self.k, generator)
        self._record(before.mean().item(), after.mean().item(), x0.shape[0], start, noop=False)
        return noise.to(x0.dtype)

    def assign(self, x0: torch.Tensor, noise: torch.Tensor,
               groups: torch.Tensor | Sequence | None = None) -> torch.Tensor:
        """The rows of `noise` permuted so that sum_i ||x0_i - noise_i||_2 is minimal (within groups if given).

        Only for "linear" (and "none", which returns `noise` unchanged): KNN draws its own candidates.
        """
        if self.method == "knn":
            raise ValueError("method='knn' draws its own candidates: call imm(x0) instead of imm.assign(x0, noise)")
        self._validate(x0, noise, groups)
        return self._assign(x0, noise, groups)

    def _assign(self, x0: torch.Tensor, noise: torch.Tensor, groups) -> torch.Tensor:
        start = time.perf_counter()
        labels = None if groups is None else as_group_tensor(groups, x0.shape[0])
        if self.method == "none":
            dist = row_distances(x0, noise).mean().item()
            self._record(dist, dist, x0.shape[0], start, noop=True)
            return noise
        cost_dtype = resolve_cost_dtype(self.cost_dtype, x0.device)
        cost = pairwise_l2(x0, noise, cost_dtype).cpu()
        perm = assignment_permutation(cost, labels, self.solver)
        assigned = noise.index_select(0, perm.to(noise.device))  # noise[perm], without advanced indexing's overhead
        if cost_dtype == "float32":
            before, after = cost.diagonal(), cost[torch.arange(perm.numel()), perm]
        else:  # report true float32 distances, not the low-precision cost
            before, after = row_distances(x0, noise), row_distances(x0, assigned)
        self._record(before.mean().item(), after.mean().item(), x0.shape[0], start, not can_repair(x0.shape[0], labels))
        return assigned

    def _validate(self, x0, noise=None, groups=None) -> None:
        if not isinstance(x0, torch.Tensor) or x0.dim() < 1 or x0.shape[0] == 0:
            raise ValueError("x0 must be a tensor with a non-empty batch dimension [B, ...]")
        if not x0.is_floating_point():
            raise ValueError(f"x0 must be a floating-point tensor, got {x0.dtype}")
        check_finite("x0", x0)
        if noise is not None:
            if not isinstance(noise, torch.Tensor) or noise.shape != x0.shape:
                shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
                raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {shape}")
            check_finite("noise", noise)
        if groups is not None:
            as_group_tensor(groups, x0.shape[0])

    def _record(self, before: float, after: float, batch_size: int, start: float, noop: bool) -> None:
        reduction = 1.0 - after / before if before > 0 else 0.0
        self.last_stats = AssignmentStats(self.method, batch_size, before, after, reduction,
                                          (time.perf_counter() - start) * 1000.0, noop)
