"""The default assignment scope "auto": one global assignment up to AUTO_GLOBAL_MAX_BATCH samples over all
processes, each process's own batch beyond (W threads stand in for W processes, as in test_distributed.py)."""

import types

import torch

from test_distributed import ThreadGroup

from immiscible_pipeline import ImmiscibleNoise
from immiscible_pipeline.noise.global_batch import (AUTO_GLOBAL_MAX_BATCH, build_immiscible, Collective,
                                                    GlobalImmiscibleNoise, resolve_scope)
from immiscible_pipeline.training.arguments import assignment_batch_warning


def batches(sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = [torch.randn(size, 3, 4, 4, generator=gen) for size in sizes]
    return x0, [torch.randn(x.shape, generator=gen) for x in x0]


def run_auto(sizes, max_global_batch):
    x0, noise = batches(sizes)
    group = ThreadGroup(len(sizes))
    imms = [GlobalImmiscibleNoise(collective=group.collective(rank), max_global_batch=max_global_batch)
            for rank in range(len(sizes))]
    outs = group.run(lambda rank, _: imms[rank].assign(x0[rank], noise[rank]))
    assert not any(isinstance(out, Exception) for out in outs), outs
    return x0, noise, outs, imms


def test_auto_is_one_global_assignment_up_to_the_limit():
    x0, noise, outs, imms = run_auto([7, 6], max_global_batch=13)
    single = ImmiscibleNoise("linear").assign(torch.cat(x0), torch.cat(noise))
    assert torch.equal(torch.cat(outs), single)
    assert all(imm.last_stats.batch_size == 13 for imm in imms)


def test_auto_assigns_each_process_on_its_own_beyond_the_limit():
    x0, noise, outs, imms = run_auto([7, 6], max_global_batch=12)
    for rank in range(2):
        assert torch.equal(outs[rank], ImmiscibleNoise("linear").assign(x0[rank], noise[rank]))
        assert imms[rank].last_stats.batch_size == [7, 6][rank] and imms[rank].last_stats.num_processes == 2
    # ... which differs from the global solve of the same batches (so the test above can fail)
    assert not torch.equal(torch.cat(outs), ImmiscibleNoise("linear").assign(torch.cat(x0), torch.cat(noise)))


def fake_accelerator(num_processes):
    return types.SimpleNamespace(gather=lambda tensor: tensor, num_processes=num_processes, process_index=0)


def test_build_immiscible_defaults_to_auto():
    assert isinstance(build_immiscible("linear"), ImmiscibleNoise)  # one process: nothing to gather
    imm = build_immiscible("linear", accelerator=fake_accelerator(2))
    assert isinstance(imm, GlobalImmiscibleNoise) and imm.max_global_batch == AUTO_GLOBAL_MAX_BATCH
    assert build_immiscible("linear", scope="global", accelerator=fake_accelerator(2)).max_global_batch is None
    assert isinstance(build_immiscible("knn", k=4, accelerator=fake_accelerator(2)), ImmiscibleNoise)
    assert Collective.from_accelerator(fake_accelerator(2)).num_processes == 2


def test_the_batch_of_one_warning_follows_the_scope():
    assert assignment_batch_warning("linear", 1, "auto", 2) is None  # assigned with the other process's sample
    assert assignment_batch_warning("linear", 1, "local", 2) is not None
    assert assignment_batch_warning("linear", 1, "auto", AUTO_GLOBAL_MAX_BATCH + 1) is not None  # local beyond
    assert assignment_batch_warning("linear", 1, "auto", 1) is not None


def test_resolve_scope():
    assert resolve_scope("auto", 64, 8) == "global" and resolve_scope("auto", 256, 8) == "local"
    assert resolve_scope("local", 4, 2) == "local" and resolve_scope("global", 512, 8) == "global"
