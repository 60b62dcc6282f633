"""The convergence benchmark: a smoke run (a few steps, one seed) and the reading of its curves."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def convergence():
    spec = importlib.util.spec_from_file_location("convergence", os.path.join(REPO, "benchmarks", "convergence.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["convergence"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_first_reach_interpolates_between_evaluations(convergence):
    curve = [{"step": 100, "fid": 50.0}, {"step": 200, "fid": 30.0}, {"step": 300, "fid": 10.0}]
    assert convergence.first_reach(curve, 20.0) == pytest.approx(250.0)
    assert convergence.first_reach(curve, 60.0) == 100.0
    assert convergence.first_reach(curve, 5.0) is None
    bumpy = [{"step": 1, "fid": 9.0}, {"step": 2, "fid": 12.0}, {"step": 3, "fid": 9.5}]
    assert convergence.first_reach(bumpy, 9.5) == 1.0  # the first time, not the last


def test_speed_up_at_equal_fid_counts_slower_methods_too(convergence):
    def run(method, seed, fids):
        return {"method": method, "seed": seed, "curve": [{"step": 100 * (i + 1), "fid": f} for i, f in enumerate(fids)],
                "step_ms_median": 1.0, "noise_ms_median": 0.1}
    runs = [run("none", 0, [40, 20, 10]), run("linear", 0, [30, 10, 8]), run("knn", 0, [45, 30, 20])]
    summary = convergence.summarise(runs, ["none", "linear", "knn"], [0])
    assert summary["reach"]["linear"][0] == pytest.approx(200.0) and summary["ratio"]["linear"] == [1.5]
    assert summary["reach"]["knn"][0] is None and summary["unreached"]["knn"] == [0]
    # knn ends at FID 20, which vanilla reached at step 200: two thirds of knn's 300 steps.
    assert summary["equal_fid"]["knn"] == [pytest.approx(2 / 3)] and summary["equal_fid"]["linear"] == [1.5]
    assert summary["equal_fid"]["none"] == [1.0]
    diverged = convergence.summarise(runs[:2] + [run("knn", 0, [45, 30, float("nan")])], ["none", "linear", "knn"], [0])
    assert diverged["equal_fid"]["knn"] == [] and diverged["unreached"]["knn"] == [0]


def test_smoke_run_writes_table_plot_and_runs(convergence, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--smoke", "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache")]
    result = convergence.main(args)

    assert result["seeds"] == [0] and result["methods"] == ["none", "linear", "knn"]
    assert {(r["method"], r["seed"]) for r in result["runs"]} == {("none", 0), ("linear", 0), ("knn", 0)}
    for run in result["runs"]:
        assert [p["step"] for p in run["curve"]] == [3, 6]
        assert all(math.isfinite(p["fid"]) and math.isfinite(p["kid_mean"]) for p in run["curve"])
        assert run["step_ms_median"] > 0 and run["noise_ms_median"] > 0
    table = (out / "results.md").read_text()
    assert "| step | none | linear | knn |" in table and "| 3 |" in table and "| 6 |" in table
    assert "speed-up" in table and "Speed-up at equal FID" in table and "noise call share" in table
    assert (out / "fid_vs_steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved["classifier_test_accuracy"] is not None and len(list((out / "runs").glob("*.json"))) == 3

    # Same settings again: the finished runs are reused, not retrained.
    capsys.readouterr()
    again = convergence.main(args)
    assert capsys.readouterr().out.count("reusing") == 3
    assert [r["curve"] for r in again["runs"]] == [r["curve"] for r in result["runs"]]
