"""The noise-bias benchmark: its --quick grid runs end to end and measures what KNN and linear assignment do."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "noise_bias.py"
QUICK_CELLS = {(source, dim, method) for source in ("mnist", "gaussian") for dim in (256, 3072)
               for method in ("k=1", "k=4", "k=64", "linear")}


def load_benchmark():
    spec = importlib.util.spec_from_file_location("noise_bias", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_benchmark()


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory):
    """One --quick run (about 15 s on 2 cores): the report, what it printed, and its output prefix."""
    out = tmp_path_factory.mktemp("noise_bias") / "bias"
    capture = pytest.MonkeyPatch()
    printed = []
    capture.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
    try:
        report = bench.main(["--quick", "--no_progress", "--output", str(out)])
    finally:
        capture.undo()
    cells = {(r["source"], r["dim"], r["method"]): r for r in report["rows"]}
    return report, "\n".join(printed), out, cells


def energy(cells, source, dim, method):
    return cells[(source, dim, method)]["stats"]["energy"]["mean"]


def test_quick_grid_has_every_cell_and_writes_md_json_png(quick):
    report, text, out, cells = quick
    assert set(cells) == QUICK_CELLS and len(report["rows"]) == len(QUICK_CELLS)
    assert out.with_suffix(".md").read_text().strip() == text.strip()
    saved = json.loads(out.with_suffix(".json").read_text())
    assert {(r["source"], r["dim"], r["method"]) for r in saved["rows"]} == QUICK_CELLS
    assert out.with_suffix(".png").stat().st_size > 10_000
    for source in ("mnist", "gaussian"):  # one line per (source, D) in each of the five tables, two self-checks
        for dim in (256, 3072):
            assert sum(line.startswith(f"| {source} | {dim} |") for line in text.splitlines()) == 5 + 2
    assert "CPU: " in text and " threads" in text
    for row in report["rows"]:  # standard errors come from independent batches
        assert row["batches"] == 4 and all(row["stats"][s]["se"] > 0 for s in ("energy", "cosine"))


def test_vanilla_and_linear_keep_the_gaussian_marginal(quick):
    report, text, _, cells = quick
    assert report["self_check"]["status"] == "PASS" and "Self-check: PASS" in text
    for (source, dim, method), row in cells.items():
        if method not in ("k=1", "linear"):
            assert row["check"] is None
            continue
        assert row["check"]["status"] == "PASS"
        for stat, expected in (("energy", 1.0), ("variance", 1.0), ("mean", 0.0)):
            assert abs(row["stats"][stat]["mean"] - expected) <= 4 * row["null_se"][stat] < 0.01
    for source in ("mnist", "gaussian"):
        for dim in (256, 3072):
            vanilla = cells[(source, dim, "k=1")]
            assert abs(vanilla["stats"]["cosine"]["mean"]) < 4 * vanilla["null_se"]["cosine"]
            assert cells[(source, dim, "linear")]["stats"]["cosine"]["mean"] > 0.01  # coupled, yet Gaussian
            assert cells[(source, dim, "linear")]["reduction"]["mean"] > 0.005


def test_knn_shrinks_the_energy_more_at_small_d_and_pulls_towards_the_data(quick):
    _, _, _, cells = quick
    for source in ("mnist", "gaussian"):
        assert energy(cells, source, 256, "k=64") < 0.93  # clearly below 1 at D = 256
        for dim in (256, 3072):
            e1, e4, e64 = (energy(cells, source, dim, m) for m in ("k=1", "k=4", "k=64"))
            assert e1 > e4 > e64
            cos = [cells[(source, dim, m)]["stats"]["cosine"]["mean"] for m in ("k=1", "k=4", "k=64")]
            assert cos[0] < cos[1] < cos[2]
        for k in ("k=4", "k=64"):  # the bias shrinks as D grows
            assert 1 - energy(cells, source, 3072, k) < 0.5 * (1 - energy(cells, source, 256, k))
    # Mostly-black digits (-1 background) pull the kept noise's mean negative; Gaussian x0 has no direction to pull.
    assert cells[("mnist", 256, "k=64")]["stats"]["mean"]["mean"] < -0.05
    assert abs(cells[("gaussian", 256, "k=64")]["stats"]["mean"]["mean"]) < 0.01


def test_self_check_fails_on_a_one_percent_energy_bias(bench):
    null = bench.null_standard_errors(batch_size=1024, dim=3072, batches=4)
    assert null["energy"] == pytest.approx(math.sqrt(2 / (4 * 1024 * 3072)))
    stats = {name: {"mean": bench.EXPECTED[name], "se": 0.0} for name in bench.STATS}
    row = {"method": "linear", "stats": stats, "null_se": null}
    assert bench.self_check(row, max_z=4.0)["status"] == "PASS"
    stats["energy"] = {"mean": 0.99, "se": 0.0}
    check = bench.self_check(row, max_z=4.0)
    assert check["status"] == "FAIL" and check["worst"] == "energy"
    assert bench.self_check({**row, "method": "k=8"}, max_z=4.0) is None
