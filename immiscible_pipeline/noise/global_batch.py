"""Linear assignment over the global batch of all Accelerate processes (the official multi-GPU mode).

    imm = build_immiscible("linear", scope="global", accelerator=accelerator)
    noise = imm(latents, groups=class_labels)      # same call as ImmiscibleNoise

"global" pairs the W * B images of all W processes with the W * B noises of all processes, as if one process
held the whole batch: the result is the single-process solve of the concatenated global batch (rank order),
and each process keeps its own slice of that one permutation, so no noise is used twice (a noise may move to
another process). "local" assigns each process's batch on its own: no communication, and each batch is
already a sample of the data. "auto" (the default) is global while the global batch has at most
`AUTO_GLOBAL_MAX_BATCH` samples and local beyond: the exact solve runs on a CPU while every GPU waits, and it
grows faster than N^2 (real digits against noise, D = 4096, 2-core Xeon with AMX, `benchmarks/assignment_speed.py`:
about 60 ms at N = 1024, 0.3 s at 2048, 3 s at 4096), while the distance it removes grows only like log N.

How (collectives only, no point-to-point sends; every process runs the same steps):
  1. all-gather a small header per process (batch size, sample size, dtype, groups or not, input error), so
     processes with shorter batches (even empty ones) work and bad input on one process raises a
     ValueError on every process instead of leaving the others waiting in a collective;
  2. all-gather the noise, padded to the largest batch: every process now holds the N = sum(B_r) noises;
  3. each process computes its own rows of the cost (its x0 against all N noises: one [B_r, D] x [D, N]
     GEMM, so the distance work is split across processes) and the rows are all-gathered: every process
     holds the bit-identical N x N matrix (and the group labels, gathered the same way);
  4. every process solves that identical problem with the same deterministic exact solver (no broadcast of
     a result is needed) and keeps noise[perm[its slice]];
  5. all-gather three numbers per process (its distance sums before/after and a checksum of the
     permutation): the stats describe the global batch, and a process that solved differently (it cannot
     happen with identical solvers; it would mean mixed installations) raises instead of silently reusing
     noise.

Communication, received by each process, for W processes, padded batch Bmax (= the largest B_r), N = W * Bmax,
D values per sample, s bytes per noise value (4 for float32, 2 for fp16/bf16):
    noise  N * D * s  bytes   (the same gather the official code does)
    cost   N * N * 4  bytes   (float32 rows; less than gathering x0 as well whenever N < D * s / 4)
    labels N * 8      bytes   (only with groups)
    header and stats 5 * W * 8 + 3 * W * 8 bytes
e.g. 8 GPUs x 64 SD latents of 4x64x64 in bf16: 16.8 MB of noise + 1.0 MB of cost per step. Gathering x0 and
letting every process compute the whole matrix would send N * D * s bytes instead of N * N * 4, but then the
processes' matrices are only as identical as their GEMMs; gathering the rows makes them identical by
construction. Each process solves the N x N problem itself: the same latency as one process solving it.

KNN pairs each sample with its own fresh candidates, so a global batch changes nothing for it:
`build_immiscible("knn", scope="global")` returns the local `ImmiscibleNoise` (likewise for "none").
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .immiscible_noise import as_group_tensor, AssignmentStats, can_repair, draw_noise, ImmiscibleNoise, is_finite
from .linear_assignment import COST_DTYPE_CHOICES, SOLVERS, assignment_permutation, pairwise_l2

logger = logging.getLogger(__name__)

SCOPES = ("auto", "local", "global")
AUTO_GLOBAL_MAX_BATCH = 1024  # scope "auto": one global assignment up to this many samples over all processes

# Header fields exchanged before any data (one int64 row per process).
_H_BATCH, _H_SAMPLE, _H_DTYPE, _H_GROUPS, _H_ERROR = range(5)
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_CHECKSUM_MODULUS = 2**31 - 1


@dataclass
class Collective:
    """The one collective the global assignment needs, and where this process stands.

    `all_gather(tensor)` must return the tensors of all processes (same shape on every process) concatenated
    along dim 0 in rank order, on the tensor's device: `accelerator.gather` does exactly that.
    """

    all_gather: Callable[[torch.Tensor], torch.Tensor]
    num_processes: int = 1
    process_index: int = 0

    @classmethod
    def from_accelerator(cls, accelerator) -> "Collective":
        return cls(accelerator.gather, int(accelerator.num_processes), int(accelerator.process_index))

    @classmethod
    def current(cls) -> "Collective":
        """torch.distributed's default group if it is initialised (as under `accelerate launch`), else one process."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(_torch_all_gather, dist.get_world_size(), dist.get_rank())
        return cls(lambda tensor: tensor, 1, 0)


def _torch_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, tensor)
    return torch.cat(parts, dim=0)


@dataclass
class GlobalAssignmentStats(AssignmentStats):
    """`AssignmentStats` of the global batch (batch_size = N, the sum over processes), plus where it ran."""

    num_processes: int = 1
    local_batch_size: int = 0


def resolve_scope(scope: str, batch_size: int, num_processes: int) -> str:
    """"local" or "global": how batches of `batch_size` per process on `num_processes` processes are assigned
    under `scope` (with one process both are the same; "auto" is global up to AUTO_GLOBAL_MAX_BATCH samples)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "auto":
        return "global" if batch_size * num_processes <= AUTO_GLOBAL_MAX_BATCH else "local"
    return scope


def build_immiscible(method: str = "linear", k: int = 8, cost_dtype: str = "auto", scope: str = "auto",
                     accelerator=None, **kwargs):
    """The noise assigner a training script needs: `noise = imm(x0, generator=None, groups=None)`.

    Args:
        method, k, cost_dtype, **kwargs (solver, knn_sampler): as for `ImmiscibleNoise`.
        scope: "auto" (default: global while the batch of all processes has at most `AUTO_GLOBAL_MAX_BATCH`
            samples, local beyond), "local" (each process assigns its own batch, no communication) or "global"
            (linear assignment over the batch of all processes, see `GlobalImmiscibleNoise`).
        accelerator: the `accelerate.Accelerator` whose processes form the global batch; without one,
            torch.distributed's default group is used if initialised, else the single process.

    "knn" and "none" pair each sample on its own, so the scope changes nothing for them and the local
    `ImmiscibleNoise` is returned; so does "auto" with one process. With one process, "global" gives exactly
    the local result.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    local = ImmiscibleNoise(method=method, k=k, cost_dtype=cost_dtype, **kwargs)  # validates every argument
    if scope == "local":
        return local
    if method != "linear":
        logger.info("scope=%r changes nothing for method=%r (each sample is paired on its own): "
                    "using the per-process ImmiscibleNoise", scope, method)
        return local
    imm = GlobalImmiscibleNoise(cost_dtype=cost_dtype, solver=local.solver, accelerator=accelerator,
                                max_global_batch=AUTO_GLOBAL_MAX_BATCH if scope == "auto" else None)
    if scope == "auto" and imm._collective().num_processes == 1:
        return local
    return imm


class GlobalImmiscibleNoise:
    """Linear assignment over the global batch of all processes; same call signature as `ImmiscibleNoise`.

    Every process must call it at the same step (it runs collectives), with its own batch; batch sizes may
    differ between processes (a shorter last batch, even an empty one). The result on each process is its
    slice of the single-process solution for the batch concatenated in rank order. See the module docstring
    for the protocol and its communication volume.

    Args:
        cost_dtype: dtype of the x.n product in the cost ("auto": bfloat16 where fast, else float32; "float32"
            exact; "bfloat16"/"float16" quantized). Each process resolves "auto" for its device; the rows are
            gathered, so every process still solves one identical matrix.
        solver: "auto", "lapcpp", "lap" or "scipy" (exact; all processes must use the same one).
        accelerator: an `accelerate.Accelerator` (its `gather` is the collective used).
        collective: a `Collective` instead of an accelerator (other launchers, tests).
        max_global_batch: when the global batch has more samples than this, each process assigns its own batch
            instead (decided alike on every process from the exchanged batch sizes); None: always global.
    Groups must be integer labels (a tensor or ints), so that equal labels mean the same class on every process.
    """

    method = "linear"

    def __init__(self, cost_dtype: str = "auto", solver: str = "auto", accelerator=None,
                 collective: Collective | None = None, max_global_batch: int | None = None):
        if cost_dtype not in COST_DTYPE_CHOICES:
            raise ValueError(f"cost_dtype must be one of {COST_DTYPE_CHOICES}, got {cost_dtype!r}")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if accelerator is not None and collective is not None:
            raise ValueError("pass either accelerator or collective, not both")
        self.cost_dtype, self.solver = cost_dtype, solver
        self.accelerator, self.collective = accelerator, collective
        self.max_global_batch = max_global_batch
        self.last_stats: GlobalAssignmentStats | None = None
        self._warned_local = False

    def __repr__(self) -> str:
        scope = "global" if self.max_global_batch is None else f"auto: global up to {self.max_global_batch} samples"
        return f"GlobalImmiscibleNoise(method='linear', cost_dtype={self.cost_dtype!r}, scope={scope!r})"

    def _collective(self) -> Collective:
        if self.collective is not None:
            return self.collective
        if self.accelerator is not None:
            return Collective.from_accelerator(self.accelerator)
        return Collective.current()

    def __call__(self, x0: torch.Tensor, generator: torch.Generator | None = None,
                 groups: torch.Tensor | Sequence | None = None) -> torch.Tensor:
        """Fresh N(0, I) noise shaped like x0 (this process's batch), assigned over the global batch."""
        _check_tensor(x0)
        return self.assign(x0, draw_noise(x0, generator), groups=groups)

    def assign(self, x0: torch.Tensor, noise: torch.Tensor,
               groups: torch.Tensor | Sequence | None = None) -> torch.Tensor:
        """This process's rows of the global noise, permuted to minimise the global sum of ||x0_i - noise_i||."""
        _check_tensor(x0)
        start = time.perf_counter()
        coll = self._collective()
        device = x0.device
        batch = x0.shape[0]
        sample = _sample_size(x0)
        error, labels = _local_error(x0, noise, groups)

        header = torch.zeros(1, 5, dtype=torch.int64, device=device)
        header[0, _H_BATCH], header[0, _H_SAMPLE] = batch, sample
        header[0, _H_DTYPE] = _DTYPE_CODES.get(noise.dtype if isinstance(noise, torch.Tensor) else x0.dtype, -1)
        header[0, _H_GROUPS], header[0, _H_ERROR] = int(groups is not None), int(error is not None)
        headers = coll.all_gather(header).cpu()
        _raise_on_bad_headers(headers, error, coll.process_index)

        sizes = headers[:, _H_BATCH].tolist()
        total, padded = sum(sizes), max(sizes)
        offset = sum(sizes[:coll.process_index])
        if total == 0:
            self._record([0.0, 0.0], total, batch, coll, start, noop=True)
            return noise
        if self.max_global_batch is not None and total > self.max_global_batch:
            return self._assign_locally(x0, noise, labels, total, coll, start)
        valid = torch.cat([torch.arange(r * padded, r * padded + s) for r, s in enumerate(sizes)]).to(device)

        x = x0.reshape(batch, sample)
        noise_all = coll.all_gather(_pad_rows(noise.reshape(batch, sample), padded))[valid]  # [N, D]
        if batch > 0:
            rows = pairwise_l2(x, noise_all, self.cost_dtype)  # [B_r, N] float32
        else:
            rows = torch.zeros(0, total, dtype=torch.float32, device=device)
        cost = coll.all_gather(_pad_rows(rows, padded))[valid]  # [N, N], identical on every process
        labels_all = None
        if labels is not None:
            labels_all = coll.all_gather(_pad_rows(labels.to(device), padded))[valid].cpu()

        perm = assignment_permutation(cost, labels_all, self.solver)  # CPU int64, the same everywhere
        assigned = noise_all[perm[offset:offset + batch].to(device)]  # [B_r, D]

        # Exact float32 distances of this process's pairs, whatever precision the cost used.
        before = (x.float() - noise.reshape(batch, sample).float()).norm(dim=1).sum().item()
        after = (x.float() - assigned.float()).norm(dim=1).sum().item()
        weights = torch.arange(total, dtype=torch.int64) % 65521 + 1
        checksum = int((perm * weights).sum().item()) % _CHECKSUM_MODULUS
        summary = torch.tensor([[before, after, float(checksum)]], dtype=torch.float64, device=device)
        summaries = coll.all_gather(summary).cpu()
        if not bool((summaries[:, 2] == summaries[0, 2]).all()):
            raise RuntimeError("processes solved the global assignment differently (mixed solver installations?): "
                               "refusing to hand out noise that could be used twice")
        noop = not can_repair(total, labels_all)
        self._record(summaries[:, :2].sum(0).tolist(), total, batch, coll, start, noop)
        return assigned.reshape(noise.shape)

    def _assign_locally(self, x0, noise, labels, total, coll, start) -> torch.Tensor:
        """Above `max_global_batch`: this process's batch on its own (stats of this batch, no more collectives)."""
        if not self._warned_local and coll.process_index == 0:
            logger.warning("The global batch has %d samples, more than %d: each process assigns its own batch "
                           "(assignment scope 'auto'; 'global' forces one assignment over all processes)",
                           total, self.max_global_batch)
            self._warned_local = True
        local = ImmiscibleNoise("linear", cost_dtype=self.cost_dtype, solver=self.solver)
        assigned = local.assign(x0, noise, groups=labels)
        stats = local.last_stats
        self.last_stats = GlobalAssignmentStats("linear", stats.batch_size, stats.mean_distance_before,
                                                stats.mean_distance_after, stats.relative_reduction,
                                                (time.perf_counter() - start) * 1000.0, stats.noop,
                                                num_processes=coll.num_processes, local_batch_size=x0.shape[0])
        return assigned

    def _record(self, sums, total, batch, coll, start, noop) -> None:
        before = sums[0] / total if total else 0.0
        after = sums[1] / total if total else 0.0
        reduction = 1.0 - after / before if before > 0 else 0.0
        self.last_stats = GlobalAssignmentStats("linear", total, before, after, reduction,
                                                (time.perf_counter() - start) * 1000.0, noop,
                                                num_processes=coll.num_processes, local_batch_size=batch)


def _check_tensor(x0) -> None:
    # Type errors are programming errors, the same on every process: raised at once, before any collective.
    if not isinstance(x0, torch.Tensor) or x0.dim() < 1:
        raise ValueError("x0 must be a tensor with a batch dimension [B, ...]")
    if not x0.is_floating_point():
        raise ValueError(f"x0 must be a floating-point tensor, got {x0.dtype}")


def _sample_size(x0: torch.Tensor) -> int:
    size = 1
    for dim in x0.shape[1:]:
        size *= dim
    return size


def _local_error(x0, noise, groups) -> tuple[str | None, torch.Tensor | None]:
    """Problems with this process's input (to be shared with the others), and its labels as int64."""
    if not isinstance(noise, torch.Tensor) or noise.shape != x0.shape:
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        return f"noise must have the shape of x0 {tuple(x0.shape)}, got {shape}", None
    if not noise.is_floating_point():
        return f"noise must be a floating-point tensor, got {noise.dtype}", None
    if noise.device != x0.device:
        return f"noise is on {noise.device} but x0 on {x0.device}", None
    for name, tensor in (("x0", x0), ("noise", noise)):
        if not is_finite(tensor):
            return f"{name} contains NaN or inf values", None
    if groups is None:
        return None, None
    try:
        return None, integer_labels(groups, x0.shape[0])
    except ValueError as err:
        return str(err), None


def integer_labels(groups, batch_size: int) -> torch.Tensor:
    """Group labels as an int64 tensor; only integers, whose meaning is the same on every process.

    (Strings would have to be coded per process, and the codes would disagree between processes.)
    """
    if not isinstance(groups, torch.Tensor):
        groups = list(groups)
        if not all(isinstance(g, int) or (hasattr(g, "dtype") and getattr(g.dtype, "kind", "") in "iub")
                   for g in groups):
            raise ValueError("scope='global' needs integer group labels (a tensor or ints) so that a label "
                             "means the same class on every process; map other labels to ints first")
        groups = torch.tensor([int(g) for g in groups], dtype=torch.int64)
    labels = as_group_tensor(groups, batch_size)  # checks one label per sample
    if labels.is_floating_point():
        if not bool((labels == labels.round()).all()):
            raise ValueError("scope='global' needs integer group labels, got non-integral values")
    elif labels.is_complex():
        raise ValueError("scope='global' needs integer group labels, got complex values")
    return labels.to(torch.int64)


def _raise_on_bad_headers(headers: torch.Tensor, error: str | None, rank: int) -> None:
    """Raise the same kind of error on every process when any process's input is unusable."""
    if error is not None:
        raise ValueError(error)
    bad = headers[:, _H_ERROR].nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"process(es) {bad} rejected their input (see their error); process {rank} stops too")
    if not bool((headers[:, _H_SAMPLE] == headers[0, _H_SAMPLE]).all()):
        raise ValueError(f"samples differ in size between processes: {headers[:, _H_SAMPLE].tolist()} values")
    if not bool((headers[:, _H_DTYPE] == headers[0, _H_DTYPE]).all()):
        raise ValueError("the noise dtype differs between processes")
    if not bool((headers[:, _H_GROUPS] == headers[0, _H_GROUPS]).all()):
        raise ValueError("some processes passed groups and others did not: pass groups on every process or none")


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor.contiguous()
    pad = torch.zeros((rows - tensor.shape[0],) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, pad], dim=0)


__all__ = ["AUTO_GLOBAL_MAX_BATCH", "SCOPES", "Collective", "GlobalAssignmentStats", "GlobalImmiscibleNoise",
           "build_immiscible", "integer_labels", "resolve_scope"]
