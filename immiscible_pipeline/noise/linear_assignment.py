"""Exact minimum-cost pairing of a batch of images with a batch of noises.

Pure tensor math: no files, no Accelerate. The B x B cost matrix is computed where the tensors live
(a GEMM, never a [B, B, D] difference tensor); only that matrix travels to the CPU solver.
"""

from __future__ import annotations

import functools
import importlib

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

COST_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COST_DTYPE_CHOICES = ("auto", *COST_DTYPES)  # auto: bfloat16 where its GEMM is fast, float32 elsewhere
# Exact solvers, fastest first: "auto" takes the first one installed. Measured on the costs the trainers produce
# (MNIST digits against Gaussian noise, B = 1024-4096, `benchmarks/assignment_speed.py --sections solvers`): lapcpp's
# Jonker-Volgenant 3-5x faster than lap's, lap's 1.5-2.5x faster than scipy's. All three find the same optimum.
SOLVER_PACKAGES = {"lapcpp": "lapcpp", "lap": "lap", "scipy": "scipy"}
SOLVERS = ("auto", *SOLVER_PACKAGES)


@functools.lru_cache(maxsize=None)
def _solver_module(name: str):
    try:
        return importlib.import_module(SOLVER_PACKAGES[name])
    except ImportError:
        return None


def installed_solvers() -> tuple[str, ...]:
    """The exact solvers that can run here, fastest first."""
    return tuple(name for name in SOLVER_PACKAGES if _solver_module(name) is not None)


def resolve_solver(solver: str) -> str:
    """The solver `solver` names: "auto" becomes the fastest one installed; a named one must be installed."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "auto":
        return installed_solvers()[0]
    if _solver_module(solver) is None:
        raise ImportError(f"solver={solver!r} needs the `{SOLVER_PACKAGES[solver]}` package: "
                          f"pip install {SOLVER_PACKAGES[solver]}")
    return solver


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
    x.n GEMM runs in that dtype, from one cast of each operand; the squared norms are taken once in float32 from
    the inputs and added in float32, which keeps the optimum where a plain low-precision distance does not.
    Besides the casts, nothing of size [B, D] is allocated: at B = 1024, D = 4096 the GEMM is most of the time.
    """
    dtype = COST_DTYPES[resolve_cost_dtype(cost_dtype, x.device)]
    x, n = x.reshape(x.shape[0], -1), n.reshape(n.shape[0], -1)
    sq_x = torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).square_()
    sq_n = torch.linalg.vector_norm(n, dim=1, dtype=torch.float32).square_()
    if dtype == torch.float32:
        dot = x.float() @ n.float().T  # no copy for float32 inputs
    elif dtype == torch.bfloat16:  # float32's exponent range: the product cannot overflow
        dot = (x.to(dtype) @ n.to(dtype).T).float()
    else:
        # fp16 overflows at 65504: scale both sides by D^-1/4 (in place, on the cast copies) so that the product
        # is O(sqrt(D)) smaller.
        scale = x.shape[1] ** -0.25
        dot = (x.to(dtype, copy=True).mul_(scale) @ n.to(dtype, copy=True).mul_(scale).T).float().div_(scale * scale)
    # In place on the [B, M] product: -2 x.n + ||x||^2 + ||n||^2, clamped at 0 against rounding, square root.
    return dot.mul_(-2.0).add_(sq_x[:, None]).add_(sq_n[None, :]).clamp_min_(0.0).sqrt_()


def solve_assignment(cost, solver: str = "auto") -> np.ndarray:
    """Column index assigned to each row that minimises the total cost of a square matrix (exact)."""
    name = resolve_solver(solver)
    cost = _cpu_cost(cost).numpy() if isinstance(cost, torch.Tensor) else np.asarray(cost)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"cost must be a square matrix, got shape {cost.shape}")
    if cost.shape[0] <= 1:
        return np.zeros(cost.shape[0], dtype=np.int64)
    if name == "scipy":
        return linear_sum_assignment(np.asarray(cost, dtype=np.float64))[1].astype(np.int64)
    # A constant per row leaves the optimum unchanged and roughly halves Jonker-Volgenant's work on L2 costs.
    reduced = _row_reduced(cost, keep_float32=name == "lapcpp")
    if name == "lapcpp":
        rows, cols = _solver_module("lapcpp").lapjv(reduced, return_cost=False)
        perm = np.empty(cost.shape[0], dtype=np.int64)
        perm[rows] = cols
        return perm
    return np.asarray(_solver_module("lap").lapjv(reduced, extend_cost=False)[1], dtype=np.int64)


def _cpu_cost(cost: torch.Tensor) -> torch.Tensor:
    """`cost` on the CPU, float32 kept as it is for lapcpp (see _row_reduced), other dtypes as float64."""
    cost = cost.detach().cpu()
    return cost if cost.dtype in (torch.float32, torch.float64) else cost.double()


def _row_reduced(cost: np.ndarray, keep_float32: bool) -> np.ndarray:
    """`cost` minus each row's minimum, contiguous. A float32 matrix (what `pairwise_l2` gives) stays float32
    when every entry lies within twice its row's minimum, as distances between images and noise do: each
    difference is then exact in float32 (Sterbenz), so the solver sees exactly the float64 problem with half the
    bytes (lapcpp keeps its potentials in float64). Anything else is reduced in float64."""
    if keep_float32 and cost.dtype == np.float32:
        low = cost.min(axis=1, keepdims=True)
        if np.all(low >= 0) and np.all(cost.max(axis=1, keepdims=True) <= 2 * low):
            return np.ascontiguousarray(cost - low)
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    return cost - cost.min(axis=1, keepdims=True)


def group_indices(groups: torch.Tensor) -> list[torch.Tensor]:
    """Row indices (on the CPU) of each group with at least two members; singletons cannot be re-paired."""
    groups = groups.detach().cpu()
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    return [idx for idx in torch.split(order, counts.tolist()) if idx.numel() > 1]


def assignment_permutation(cost: torch.Tensor, groups: torch.Tensor | None = None,
                           solver: str = "auto") -> torch.Tensor:
    """Permutation `perm` (CPU int64) minimising sum_i cost[i, perm[i]], within equal `groups` only."""
    cost_cpu = _cpu_cost(cost)
    batch = cost_cpu.shape[0]
    if groups is None:
        return torch.from_numpy(solve_assignment(cost_cpu.numpy(), solver))
    perm = torch.arange(batch)
    for idx in group_indices(groups):
        sub = cost_cpu[idx][:, idx].numpy()
        perm[idx] = idx[torch.from_numpy(solve_assignment(sub, solver))]
    return perm
