"""Run by tests/test_distributed.py under `accelerate launch` (2 CPU processes, gloo).

Each process runs the global assignment on its own batch in several scenarios and saves its inputs and
outputs to <out_dir>/rank<r>.pt; the test compares them, in the parent process, with a single-process solve.
"""

import sys

import torch
from accelerate import Accelerator

from immiscible_pipeline.noise.global_batch import build_immiscible
from immiscible_pipeline.training.accelerator_setup import end_training


def batch(seed, size, shape=(3, 4, 4), dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn((size,) + shape, generator=gen).to(dtype)
    noise = torch.randn((size,) + shape, generator=gen).to(dtype)
    labels = torch.randint(0, 3, (size,), generator=gen)
    return x0, noise, labels


def stats(imm):
    return vars(imm.last_stats).copy()


def main(out_dir):
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    result = {"num_processes": world, "process_index": rank, "distributed_type": str(accelerator.distributed_type)}

    # Equal batches, explicit noise, float32 cost.
    x0, noise, _ = batch(10 + rank, 6)
    imm = build_immiscible("linear", scope="global", accelerator=accelerator)
    out = imm.assign(x0, noise)
    result["equal"] = dict(x0=x0, noise=noise, out=out, stats=stats(imm))

    # Unequal batches (7 and 4) with class labels, through the training-loop call imm(x0, generator, groups).
    x0, _, labels = batch(20 + rank, 7 if rank == 0 else 4)
    out = imm(x0, generator=torch.Generator().manual_seed(30 + rank), groups=labels)
    drawn = torch.randn(x0.shape, generator=torch.Generator().manual_seed(30 + rank))  # the noise imm drew
    result["unequal_groups"] = dict(x0=x0, noise=drawn, labels=labels, out=out, stats=stats(imm))

    # bfloat16 tensors and a bfloat16 cost.
    x0, noise, _ = batch(40 + rank, 5 + rank, shape=(4, 4, 4), dtype=torch.bfloat16)
    imm_bf16 = build_immiscible("linear", cost_dtype="bfloat16", scope="global", accelerator=accelerator)
    out = imm_bf16.assign(x0, noise)
    result["bf16"] = dict(x0=x0, noise=noise, out=out, stats=stats(imm_bf16))

    # One process with an empty batch.
    x0, noise, _ = batch(50 + rank, 5 if rank == 0 else 0)
    out = imm.assign(x0, noise)
    result["empty"] = dict(x0=x0, noise=noise, out=out, stats=stats(imm))

    # No accelerator given: torch.distributed's default group.
    x0, noise, _ = batch(60 + rank, 3)
    imm_dist = build_immiscible("linear", scope="global")
    out = imm_dist.assign(x0, noise)
    result["no_accelerator"] = dict(x0=x0, noise=noise, out=out, stats=stats(imm_dist))

    # Bad input on process 1 only: every process must raise (not wait forever in a collective).
    x0, noise, _ = batch(70 + rank, 4)
    if rank == 1:
        noise[0, 0, 0, 0] = float("nan")
    try:
        imm.assign(x0, noise)
        result["error"] = None
    except ValueError as err:
        result["error"] = str(err)

    torch.save(result, f"{out_dir}/rank{rank}.pt")
    accelerator.wait_for_everyone()
    end_training(accelerator)


if __name__ == "__main__":
    main(sys.argv[1])
