"""Linear assignment: optimality, the permutation property, groups, stats, dtypes, determinism, bad input."""

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import immiscible_pipeline.noise.linear_assignment as linear_assignment
from immiscible_pipeline import ImmiscibleNoise, assignment_permutation, pairwise_l2, solve_assignment
from immiscible_pipeline.data import mnist_arrays


def total_distance(x0, noise):
    return (x0.reshape(len(x0), -1).double() - noise.reshape(len(noise), -1).double()).norm(dim=1).sum().item()


def image_like(batch, shape=(3, 8, 8), seed=0):
    """Smooth, correlated, non-Gaussian batches in [-1, 1], like normalised images."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, shape[0], 2, 2, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=shape[1:], mode="bilinear", align_corners=False)


@pytest.mark.parametrize("batch", [2, 3, 5, 7])
def test_linear_is_optimal_against_brute_force(batch):
    g = torch.Generator().manual_seed(batch)
    x0 = torch.randn(batch, 6, generator=g) * 2
    noise = torch.randn(batch, 6, generator=g)
    assigned = ImmiscibleNoise("linear", cost_dtype="float32").assign(x0, noise)  # exact on any machine
    best = min(total_distance(x0, noise[list(p)]) for p in itertools.permutations(range(batch)))
    assert total_distance(x0, assigned) == pytest.approx(best, rel=1e-6)


EXACT_SOLVERS = [name for name in linear_assignment.SOLVERS if name != "auto"]  # every solver offered


def mnist_against_noise(batch, side, seed):
    """The cost the trainers solve: L2 between real digits (resized to side x side, in [-1, 1]) and N(0, I) noise."""
    images, _ = mnist_arrays("test")
    pick = np.random.default_rng(seed).choice(len(images), batch, replace=False)
    x0 = torch.nn.functional.interpolate(torch.from_numpy(images[pick]).float()[:, None] / 127.5 - 1, size=(side, side),
                                         mode="bilinear", align_corners=False).reshape(batch, -1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.cdist(x0.double(), noise).numpy()


def assert_exact(cost, cols):
    assert sorted(cols.tolist()) == list(range(len(cost))), "not a permutation"
    rows, ref_cols = linear_sum_assignment(cost)
    assert cost[np.arange(len(cost)), cols].sum() == pytest.approx(cost[rows, ref_cols].sum(), rel=1e-12)


@pytest.mark.parametrize("solver", EXACT_SOLVERS)
@pytest.mark.parametrize("batch", [8, 64, 256])
def test_solver_matches_scipy_on_explicit_costs(solver, batch):
    rng = np.random.default_rng(batch)
    assert_exact(cost := rng.random((batch, batch)) * 10, solve_assignment(cost, solver))


@pytest.mark.parametrize("solver", EXACT_SOLVERS)
@pytest.mark.parametrize("batch, side", [(256, 16), (96, 32)])
def test_solver_reaches_the_optimum_on_digits_against_noise(solver, batch, side):
    cost = mnist_against_noise(batch, side, seed=batch)
    assert_exact(cost, solve_assignment(cost, solver))


@pytest.mark.parametrize("solver", EXACT_SOLVERS)
@pytest.mark.parametrize("kind", ["digits", "uniform"])
def test_float32_costs_reach_the_optimum_of_the_same_numbers_in_float64(solver, kind):
    # pairwise_l2 gives float32: lapcpp solves digit distances in float32 (their row reduction is exact there);
    # uniform [0, 10) costs break that condition and must still come out optimal (reduced in float64).
    rng = np.random.default_rng(3)
    cost = mnist_against_noise(256, 16, seed=3) if kind == "digits" else rng.random((256, 256)) * 10
    cost32 = cost.astype(np.float32)
    assert_exact(cost32.astype(np.float64), solve_assignment(cost32, solver))
    assert_exact(cost32.astype(np.float64), solve_assignment(torch.from_numpy(cost32), solver))


def test_float32_row_reduction_is_kept_only_where_it_is_exact():
    digits = linear_assignment._row_reduced(mnist_against_noise(64, 16, seed=4).astype(np.float32), keep_float32=True)
    uniform = linear_assignment._row_reduced(np.random.default_rng(4).random((64, 64), dtype=np.float32),
                                             keep_float32=True)
    assert digits.dtype == np.float32 and uniform.dtype == np.float64
    assert (digits.min(axis=1) == 0).all() and (uniform.min(axis=1) == 0).all()


@pytest.mark.parametrize("solver", EXACT_SOLVERS)
def test_solver_is_optimal_against_brute_force_and_with_ties(solver):
    rng = np.random.default_rng(0)
    for batch in (2, 3, 6):
        cost = rng.random((batch, batch))
        best = min(cost[np.arange(batch), list(p)].sum() for p in itertools.permutations(range(batch)))
        assert cost[np.arange(batch), solve_assignment(cost, solver)].sum() == pytest.approx(best, rel=1e-12)
    assert_exact(cost := rng.integers(0, 4, (64, 64)).astype(float), solve_assignment(cost, solver))  # many ties


@pytest.mark.parametrize("solver", EXACT_SOLVERS)
def test_solvers_return_a_permutation_on_degenerate_costs(solver):  # every pairing is optimal: no ties may break them
    assert sorted(solve_assignment(np.ones((16, 16)), solver).tolist()) == list(range(16))


def test_auto_solver_takes_the_fastest_installed_and_a_missing_one_is_named(monkeypatch):
    assert linear_assignment.resolve_solver("auto") == linear_assignment.installed_solvers()[0]
    present = {"lapcpp": False, "lap": True, "scipy": True}
    monkeypatch.setattr(linear_assignment, "_solver_module", lambda name: object() if present[name] else None)
    assert linear_assignment.resolve_solver("auto") == "lap"
    present["lap"] = False
    assert linear_assignment.resolve_solver("auto") == "scipy"
    with pytest.raises(ImportError, match="pip install lapcpp"):
        linear_assignment.resolve_solver("lapcpp")


def test_pairwise_l2_matches_cdist():
    g = torch.Generator().manual_seed(0)
    x, n = torch.randn(20, 3, 4, 4, generator=g), torch.randn(20, 3, 4, 4, generator=g)
    ref = torch.cdist(x.reshape(20, -1).double(), n.reshape(20, -1).double())
    assert torch.allclose(pairwise_l2(x, n).double(), ref, atol=1e-4)
    assert torch.allclose(pairwise_l2(x, n, "bfloat16").double(), ref, rtol=2e-2, atol=0.2)


def test_linear_only_permutes_the_noise_so_it_stays_gaussian():
    x0 = image_like(64)
    noise = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assigned = ImmiscibleNoise("linear").assign(x0, noise)
    # Every output row is a distinct input row ...
    matches = (assigned.reshape(64, 1, -1) == noise.reshape(1, 64, -1)).all(-1)
    assert matches.sum(1).eq(1).all() and matches.sum(0).eq(1).all()
    # ... so the multiset of noise values is unchanged, and something did move.
    assert torch.equal(assigned.flatten().sort().values, noise.flatten().sort().values)
    assert not torch.equal(assigned, noise)


def test_linear_reduces_distance_and_reports_it():
    x0 = image_like(128)
    imm = ImmiscibleNoise("linear")
    noise = torch.randn_like(x0)
    assigned = imm.assign(x0, noise)
    stats = imm.last_stats
    assert stats.batch_size == 128 and not stats.noop and stats.method == "linear"
    assert stats.mean_distance_before == pytest.approx(total_distance(x0, noise) / 128, rel=1e-5)
    assert stats.mean_distance_after == pytest.approx(total_distance(x0, assigned) / 128, rel=1e-5)
    assert stats.mean_distance_after < stats.mean_distance_before
    assert stats.relative_reduction == pytest.approx(1 - stats.mean_distance_after / stats.mean_distance_before)
    assert stats.time_ms > 0
    logged = stats.as_dict()
    assert logged["immiscible/relative_reduction"] == pytest.approx(stats.relative_reduction)


@pytest.mark.parametrize("cost_dtype", ["bfloat16", "float16"])
def test_low_precision_cost_keeps_the_distance_reduction(cost_dtype):
    x0 = image_like(128, (3, 16, 16), seed=3)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    exact_noise = ImmiscibleNoise("linear", cost_dtype="float32").assign(x0, noise)
    exact = total_distance(x0, noise) - total_distance(x0, exact_noise)
    quick_noise = ImmiscibleNoise("linear", cost_dtype=cost_dtype).assign(x0, noise)
    quick = total_distance(x0, noise) - total_distance(x0, quick_noise)
    assert exact > 0
    assert quick >= 0.99 * exact


@pytest.mark.parametrize("fast", [False, True])
def test_auto_cost_dtype_uses_bf16_only_where_it_is_fast(fast, monkeypatch):
    monkeypatch.setattr(linear_assignment, "cpu_has_bf16_units", lambda: fast)
    assert linear_assignment.resolve_cost_dtype("auto", "cpu") == ("bfloat16" if fast else "float32")
    assert linear_assignment.resolve_cost_dtype("auto", "mps") == "float32"  # no fast bf16 GEMM there
    assert linear_assignment.resolve_cost_dtype("float16", "cpu") == "float16"  # explicit names stay
    x0 = image_like(64, (3, 16, 16), seed=5)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6))
    chosen = "bfloat16" if fast else "float32"
    assert torch.equal(pairwise_l2(x0, noise, "auto"), pairwise_l2(x0, noise, chosen))
    imm = ImmiscibleNoise("linear")  # "auto" is the default
    assert imm.cost_dtype == "auto" and torch.equal(imm.assign(x0, noise),
                                                    ImmiscibleNoise("linear", cost_dtype=chosen).assign(x0, noise))


@pytest.mark.parametrize("cost_dtype", ["bfloat16", "float16"])
def test_low_precision_cost_leaves_the_inputs_alone(cost_dtype):
    dtype = getattr(torch, cost_dtype)
    x0, noise = image_like(16, seed=7).to(dtype), torch.randn(16, 3, 8, 8).to(dtype)
    x_before, n_before = x0.clone(), noise.clone()
    distances = pairwise_l2(x0, noise, cost_dtype)
    assert torch.equal(x0, x_before) and torch.equal(noise, n_before)  # the fp16 scaling works on copies
    exact = pairwise_l2(x0.float(), noise.float(), "float32")
    assert distances.dtype == torch.float32 and torch.allclose(distances, exact, rtol=2e-2, atol=0.1)


def test_batch_of_one_is_a_reported_noop():
    x0 = torch.randn(1, 4, 4, 4)
    noise = torch.randn(1, 4, 4, 4)
    imm = ImmiscibleNoise("linear")
    assert torch.equal(imm.assign(x0, noise), noise)
    assert imm.last_stats.noop and imm.last_stats.relative_reduction == 0


def test_groups_are_never_crossed_and_optimal_within_each():
    x0 = image_like(60, seed=5)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6))
    labels = torch.arange(60) % 4
    assigned = ImmiscibleNoise("linear").assign(x0, noise, groups=labels)
    source = (assigned.reshape(60, 1, -1) == noise.reshape(1, 60, -1)).all(-1).float().argmax(1)
    assert torch.equal(labels[source], labels)
    for label in range(4):
        idx = (labels == label).nonzero().squeeze(1)
        cost = torch.cdist(x0[idx].reshape(len(idx), -1).double(), noise[idx].reshape(len(idx), -1).double()).numpy()
        rows, cols = linear_sum_assignment(cost)
        assert total_distance(x0[idx], assigned[idx]) == pytest.approx(cost[rows, cols].sum(), rel=1e-6)
    # Ungrouped assignment does cross classes on the same data (so the test above can fail).
    free = ImmiscibleNoise("linear").assign(x0, noise)
    free_source = (free.reshape(60, 1, -1) == noise.reshape(1, 60, -1)).all(-1).float().argmax(1)
    assert not torch.equal(labels[free_source], labels)


def test_groups_accept_lists_of_any_labels():
    x0 = image_like(6)
    noise = torch.randn_like(x0)
    names = ["cat", "dog", "cat", "dog", "cat", "dog"]
    by_name = ImmiscibleNoise("linear").assign(x0, noise, groups=names)
    by_code = ImmiscibleNoise("linear").assign(x0, noise, groups=torch.tensor([0, 1, 0, 1, 0, 1]))
    assert torch.equal(by_name, by_code)


def test_all_singleton_groups_are_a_noop():
    x0 = image_like(5)
    noise = torch.randn_like(x0)
    imm = ImmiscibleNoise("linear")
    assert torch.equal(imm.assign(x0, noise, groups=torch.arange(5)), noise)
    assert imm.last_stats.noop


def test_assignment_permutation_is_a_permutation_within_groups():
    cost = torch.rand(10, 10)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3, 3])
    perm = assignment_permutation(cost, groups)
    assert sorted(perm.tolist()) == list(range(10))
    assert torch.equal(groups[perm], groups)


@pytest.mark.parametrize("method", ["none", "linear", "knn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 3, 8, 8), (8, 4, 4, 4), (8, 10)])
def test_shape_dtype_and_device_are_preserved(method, dtype, shape):
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        x0 = torch.rand(shape, device=device).to(dtype)
        noise = ImmiscibleNoise(method, k=4)(x0)
        assert noise.shape == x0.shape and noise.dtype == dtype and noise.device == x0.device


@pytest.mark.parametrize("method", ["none", "linear", "knn"])
def test_deterministic_given_a_generator(method):
    x0 = image_like(32)
    imm = ImmiscibleNoise(method, k=4)
    first = imm(x0, generator=torch.Generator().manual_seed(7))
    again = imm(x0, generator=torch.Generator().manual_seed(7))
    other = imm(x0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_none_returns_independent_noise_untouched():
    x0 = image_like(16)
    noise = torch.randn_like(x0)
    assert ImmiscibleNoise("none").assign(x0, noise) is noise
    drawn = ImmiscibleNoise("none")(x0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, torch.randn(x0.shape, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ImmiscibleNoise("ot"), "method must be one of"),
        (lambda: ImmiscibleNoise("knn", k=0), "k must be an integer >= 1"),
        (lambda: ImmiscibleNoise("knn", k=-3), "k must be an integer >= 1"),
        (lambda: ImmiscibleNoise("knn", k=2.5), "k must be an integer >= 1"),
        (lambda: ImmiscibleNoise("linear", cost_dtype="int8"), "cost_dtype must be one of"),
        (lambda: ImmiscibleNoise("linear", solver="hungarian"), "solver must be one of"),
    ],
)
def test_bad_settings_are_rejected(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_inputs_are_rejected_with_the_problem_named():
    imm = ImmiscibleNoise("linear")
    x0 = torch.randn(4, 3, 2, 2)
    nan_x0 = x0.clone()
    nan_x0[1, 0, 0, 0] = float("nan")
    inf_noise = torch.randn_like(x0)
    inf_noise[2, 1, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="x0 contains NaN or inf"):
        imm(nan_x0)
    with pytest.raises(ValueError, match="noise contains NaN or inf"):
        imm.assign(x0, inf_noise)
    with pytest.raises(ValueError, match=r"noise must have the shape of x0 \(4, 3, 2, 2\)"):
        imm.assign(x0, torch.randn(4, 12))
    with pytest.raises(ValueError, match="groups has 3 labels but the batch has 4"):
        imm(x0, groups=[0, 1, 0])
    with pytest.raises(ValueError, match="groups has 5 labels"):
        ImmiscibleNoise("knn")(x0, groups=torch.zeros(5))
    with pytest.raises(ValueError, match="floating-point"):
        imm(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="call imm\\(x0\\)"):
        ImmiscibleNoise("knn").assign(x0, torch.randn_like(x0))


def test_the_finiteness_check_sees_every_value_but_not_an_overflowing_sum():
    from immiscible_pipeline.noise.immiscible_noise import is_finite

    x = torch.randn(64, 32)
    assert is_finite(x) and is_finite(x.to(torch.float16)) and is_finite(x.to(torch.bfloat16))
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[40, 7] = bad
        assert not is_finite(y) and not is_finite(y.to(torch.bfloat16))
    big = torch.full((4, 4), 3e38)  # finite values whose float32 sum overflows
    assert is_finite(big) and is_finite(torch.full((100_000,), 60_000.0, dtype=torch.float16))
