"""Exact minimum-cost pairing of a batch of images with a batch of noises.

Pure tensor math: no files, no Accelerate. The B x B cost matrix is computed where the tensors live
(a GEMM, never a [B, B, D] difference tensor); only that matrix travels to the CPU solver.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

try:  # `lap` (Jonker-Volgenant, float64) is 2-4x faster than scipy at B >= 1024 and finds the same optimum.
    import lap as _lap
except ImportError:  # pragma: no cover - lap is a declared dependency; scipy stays a correct fallback
    _lap = None

COST_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COST_DTYPE_CHOICES = ("auto", *COST_DTYPES)  # auto: bfloat16 where its GEMM is fast, float32 elsewhere
SOLVERS = ("auto", "lap", "scipy")


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), as torch reports it, else as
    /proc/cpuinfo lists it. Without such units bf16 is emulated: 2-7x slower than float32 (measured here)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(check is not None for check in checks):
        return any(check() for check in checks if check is not None)
    try:
        with open("/proc/cpuinfo") as handle:
            flags = set(handle.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def bf16_is_fast(device: torch.device | str) -> bool:
    """Whether a bfloat16 GEMM beats float32 on `device`: a CUDA GPU with native bf16 (Ampere and later), a
    CPU with bf16 units. Other devices (MPS, older GPUs that emulate it) keep float32."""
    device = torch.device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):  # the question is about this device, not the current one
            try:
                return torch.cuda.is_bf16_supported(including_emulation=False)
            except TypeError:  # torch before 2.3 has no including_emulation (and reported native support only)
                return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16_units()


def resolve_cost_dtype(cost_dtype: str, device: torch.device | str) -> str:
    """The dtype name the x.n product of the cost uses on `device`: "auto" becomes "bfloat16" where that is
    fast and "float32" elsewhere; the other names are returned as they are."""
    if cost_dtype not in COST_DTYPE_CHOICES:
        raise ValueError(f"cost_dtype must be one of {COST_DTYPE_CHOICES}, got {cost_dtype!r}")
    if cost_dtype == "auto":
        return "bfloat16" if bf16_is_fast(device) else "float32"
    return cost_dtype


def pairwise_l2(x: torch.Tensor, n: torch.Tensor, cost_dtype: str = "float32") -> torch.Tensor:
    """L2 distances between the rows of x [B, D] and n [M, D], as a float32 [B, M] tensor on their device.

    Uses ||x||^2 + ||n||^2 - 2 x.n. With a low-precision `cost_dtype` (or "auto" where bf16 is fast) only the
    x.n GEMM runs in that dtype, from one cast of each operand; the norms and the sum stay in float32, which
    keeps the optimum where a plain low-precision distance does not.
    """
    dtype = COST_DTYPES[resolve_cost_dtype(cost_dtype, x.device)]
    x, n = x.reshape(x.shape[0], -1), n.reshape(n.shape[0], -1)
    x32, n32 = x.float(), n.float()  # no copy for float32 inputs
    sq = x32.pow(2).sum(1)[:, None] + n32.pow(2).sum(1)[None, :]
    if dtype == torch.float32:
        dot = x32 @ n32.T
    elif dtype == torch.bfloat16:  # float32's exponent range: the product cannot overflow
        dot = (x.to(dtype) @ n.to(dtype).T).float()
    else:
        # fp16 overflows at 65504: scale both sides by D^-1/4 (in place, on the cast copies) so that the product
        # is O(sqrt(D)) smaller.
        scale = x.shape[1] ** -0.25
        dot = (x.to(dtype, copy=True).mul_(scale) @ n.to(dtype, copy=True).mul_(scale).T).float() / (scale * scale)
    return (sq - 2.0 * dot).clamp_min_(0.0).sqrt_()


def solve_assignment(cost, solver: str = "auto") -> np.ndarray:
    """Column index assigned to each row that minimises the total cost of a square matrix (exact)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if isinstance(cost, torch.Tensor):
        cost = cost.detach().to("cpu", torch.float64).numpy()
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"cost must be a square matrix, got shape {cost.shape}")
    if cost.shape[0] <= 1:
        return np.zeros(cost.shape[0], dtype=np.int64)
    if solver == "lap" or (solver == "auto" and _lap is not None):
        if _lap is None:
            raise ImportError("solver='lap' needs the `lap` package: pip install lap")
        # A constant per row leaves the optimum unchanged and roughly halves lapjv's work on L2 costs.
        reduced = cost - cost.min(axis=1, keepdims=True)
        return np.asarray(_lap.lapjv(reduced, extend_cost=False)[1], dtype=np.int64)
    return linear_sum_assignment(cost)[1].astype(np.int64)


def group_indices(groups: torch.Tensor) -> list[torch.Tensor]:
    """Row indices (on the CPU) of each group with at least two members; singletons cannot be re-paired."""
    groups = groups.detach().cpu()
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    return [idx for idx in torch.split(order, counts.tolist()) if idx.numel() > 1]


def assignment_permutation(cost: torch.Tensor, groups: torch.Tensor | None = None, solver: str = "auto") -> torch.Tensor:
    """Permutation `perm` (CPU int64) minimising sum_i cost[i, perm[i]], within equal `groups` only."""
    cost_cpu = cost.detach().to("cpu", torch.float64)
    batch = cost_cpu.shape[0]
    if groups is None:
        return torch.from_numpy(solve_assignment(cost_cpu.numpy(), solver))
    perm = torch.arange(batch)
    for idx in group_indices(groups):
        sub = cost_cpu[idx][:, idx].numpy()
        perm[idx] = idx[torch.from_numpy(solve_assignment(sub, solver))]
    return perm
