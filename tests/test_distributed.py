"""Global-batch assignment: 2 real CPU processes (gloo, `accelerate launch`), and in-process checks.

The real launch (~15 s) runs once per session; its workers save inputs and outputs, and every check against
the single-process solve of the concatenated batch happens here in the parent process.
"""

import threading
from pathlib import Path

import pytest
import torch

from launching import launch_command, launch_environment, run_launched

from immiscible_pipeline import ImmiscibleNoise
from immiscible_pipeline.noise.global_batch import build_immiscible, Collective, GlobalImmiscibleNoise, integer_labels

WORKER = Path(__file__).parent / "scripts" / "global_assignment_worker.py"
SCENARIOS = ("equal", "unequal_groups", "empty", "no_accelerator")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("global_assignment")
    proc = run_launched(launch_command(2, WORKER, out), env=launch_environment(), timeout=240)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-5000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def concat(ranks, scenario, key):
    parts = [r[scenario][key] for r in ranks]
    return torch.cat(parts) if parts[0] is not None else None


def source_rows(out: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """For each row of `out`, the index of the identical row of `pool` (asserting there is exactly one)."""
    same = (out.reshape(out.shape[0], 1, -1) == pool.reshape(1, pool.shape[0], -1)).all(-1)
    assert (same.sum(1) == 1).all(), "an output noise is not exactly one of the input noises"
    return same.float().argmax(1)


def test_world_size_is_really_two(ranks):
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert [r["process_index"] for r in ranks] == [0, 1]
    assert all("MULTI_CPU" in r["distributed_type"] for r in ranks)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_equals_single_process_solve_of_concatenated_batch(ranks, scenario):
    x0, noise, out = concat(ranks, scenario, "x0"), concat(ranks, scenario, "noise"), concat(ranks, scenario, "out")
    labels = concat(ranks, scenario, "labels") if "labels" in ranks[0][scenario] else None
    single = ImmiscibleNoise("linear")
    assert torch.equal(out, single.assign(x0, noise, groups=labels))
    # Every process reports the stats of the global batch, and they match the single-process ones.
    for r in ranks:
        stats = r[scenario]["stats"]
        assert stats["batch_size"] == x0.shape[0] and stats["num_processes"] == 2
        assert stats["mean_distance_after"] == pytest.approx(single.last_stats.mean_distance_after, rel=1e-5)
        assert stats["mean_distance_before"] == pytest.approx(single.last_stats.mean_distance_before, rel=1e-5)
    assert [r[scenario]["out"].shape[0] for r in ranks] == [r[scenario]["x0"].shape[0] for r in ranks]


@pytest.mark.parametrize("scenario", SCENARIOS + ("bf16",))
def test_global_output_is_a_permutation_of_the_global_noise(ranks, scenario):
    noise, out = concat(ranks, scenario, "noise"), concat(ranks, scenario, "out")
    src = source_rows(out, noise)
    assert sorted(src.tolist()) == list(range(noise.shape[0])), "a noise was used twice or dropped"


def test_noise_moves_between_processes_and_batches_may_differ(ranks):
    sizes = [r["unequal_groups"]["x0"].shape[0] for r in ranks]
    assert sizes == [7, 4]
    src = source_rows(concat(ranks, "unequal_groups", "out"), concat(ranks, "unequal_groups", "noise"))
    owner_of_source = (src >= sizes[0]).long()
    owner_of_row = torch.tensor([0] * sizes[0] + [1] * sizes[1])
    assert (owner_of_source != owner_of_row).any(), "global assignment never moved a noise across processes"


def test_groups_are_never_crossed(ranks):
    labels = concat(ranks, "unequal_groups", "labels")
    src = source_rows(concat(ranks, "unequal_groups", "out"), concat(ranks, "unequal_groups", "noise"))
    assert torch.equal(labels[src], labels)


def test_bf16_tensors_and_cost_keep_dtype_and_reach_the_single_process_cost(ranks):
    assert all(r["bf16"]["out"].dtype == torch.bfloat16 for r in ranks)
    x0, noise, out = concat(ranks, "bf16", "x0"), concat(ranks, "bf16", "noise"), concat(ranks, "bf16", "out")
    single = ImmiscibleNoise("linear", cost_dtype="bfloat16").assign(x0, noise)
    total = (x0.float() - out.float()).flatten(1).norm(dim=1).sum().item()
    assert total == pytest.approx((x0.float() - single.float()).flatten(1).norm(dim=1).sum().item(), rel=1e-4)


def test_bad_input_on_one_process_raises_on_every_process(ranks):
    assert "NaN" in ranks[1]["error"]
    assert ranks[0]["error"] is not None and "process(es) [1]" in ranks[0]["error"]


# ---------------------------------------------------------------- in-process: W threads as W processes


class ThreadGroup:
    """W threads that all-gather through shared slots, standing in for W processes."""

    def __init__(self, world: int):
        self.world, self.slots = world, [None] * world
        self.barrier = threading.Barrier(world, timeout=30)

    def collective(self, rank: int) -> Collective:
        return Collective(lambda tensor: self._gather(rank, tensor), self.world, rank)

    def _gather(self, rank, tensor):
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        out = torch.cat(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return out

    def run(self, fn):
        """fn(rank, collective) on every rank in parallel; returns per-rank results or exceptions."""
        results = [None] * self.world

        def target(rank):
            try:
                results[rank] = fn(rank, self.collective(rank))
            except Exception as err:  # noqa: BLE001 - handed back to the test
                results[rank] = err

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a rank hung in a collective"
        return results


def test_three_processes_unequal_and_empty_batches_with_groups():
    gen = torch.Generator().manual_seed(3)
    sizes = [9, 0, 5]
    x0 = [torch.randn(s, 2, 5, 5, generator=gen) for s in sizes]
    noise = [torch.randn(s, 2, 5, 5, generator=gen) for s in sizes]
    labels = [torch.randint(0, 2, (s,), generator=gen) for s in sizes]
    imms = [GlobalImmiscibleNoise() for _ in sizes]

    def fn(rank, coll):
        imms[rank].collective = coll
        return imms[rank].assign(x0[rank], noise[rank], groups=labels[rank])

    outs = ThreadGroup(3).run(fn)
    single = ImmiscibleNoise("linear")
    expected = single.assign(torch.cat(x0), torch.cat(noise), groups=torch.cat(labels))
    assert [o.shape[0] for o in outs] == sizes
    assert torch.equal(torch.cat(outs), expected)
    assert len({imm.last_stats.mean_distance_after for imm in imms}) == 1
    assert imms[0].last_stats.batch_size == 14 and imms[1].last_stats.local_batch_size == 0


def test_mismatched_inputs_raise_on_every_thread_instead_of_hanging():
    x0 = torch.randn(4, 8)

    def groups_on_rank0_only(rank, coll):
        imm = GlobalImmiscibleNoise(collective=coll)
        return imm.assign(x0, torch.randn(4, 8), groups=[0, 1, 0, 1] if rank == 0 else None)

    results = ThreadGroup(2).run(groups_on_rank0_only)
    assert all(isinstance(r, ValueError) and "groups" in str(r) for r in results)

    def wrong_group_length_on_rank1(rank, coll):
        imm = GlobalImmiscibleNoise(collective=coll)
        return imm.assign(x0, torch.randn(4, 8), groups=[0, 1, 0, 1] if rank == 0 else [0, 1])

    results = ThreadGroup(2).run(wrong_group_length_on_rank1)
    assert all(isinstance(r, ValueError) for r in results)
    assert "labels" in str(results[1]) and "process(es) [1]" in str(results[0])


# ---------------------------------------------------------------- in-process: the factory


def test_build_immiscible_scopes():
    assert isinstance(build_immiscible("linear"), ImmiscibleNoise)
    assert isinstance(build_immiscible("linear", scope="global"), GlobalImmiscibleNoise)
    for method in ("knn", "none"):  # each sample is paired alone: global changes nothing
        imm = build_immiscible(method, k=4, scope="global")
        assert isinstance(imm, ImmiscibleNoise) and imm.method == method
    with pytest.raises(ValueError, match="scope"):
        build_immiscible("linear", scope="world")
    with pytest.raises(ValueError, match="method"):
        build_immiscible("optimal", scope="global")
    with pytest.raises(ValueError, match="cost_dtype"):
        build_immiscible("linear", cost_dtype="int8", scope="global")


def test_global_with_one_process_equals_local():
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(12, 3, 4, 4, generator=gen), torch.randn(12, 3, 4, 4, generator=gen)
    labels = torch.randint(0, 3, (12,), generator=gen)
    local, glob = build_immiscible("linear"), build_immiscible("linear", scope="global")
    assert torch.equal(glob.assign(x0, noise, groups=labels), local.assign(x0, noise, groups=labels))
    assert glob.last_stats.mean_distance_after == pytest.approx(local.last_stats.mean_distance_after, rel=1e-6)
    out = glob(x0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, local(x0, generator=torch.Generator().manual_seed(5)))
    assert glob.last_stats.num_processes == 1


def test_global_scope_needs_integer_labels():
    assert integer_labels([3, 1, 3], 3).tolist() == [3, 1, 3]
    with pytest.raises(ValueError, match="integer"):
        integer_labels(["cat", "dog"], 2)
    with pytest.raises(ValueError, match="integer"):
        build_immiscible("linear", scope="global").assign(torch.randn(2, 3), torch.randn(2, 3), groups=["a", "b"])
    with pytest.raises(ValueError, match="labels"):
        integer_labels([0, 1], 3)

