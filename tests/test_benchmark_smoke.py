"""The assignment speed benchmark runs end to end at a tiny size and prints the tables it promises."""

import importlib.util
import json
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "assignment_speed.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("assignment_speed", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_prints_every_table_marks_oom_and_writes_md_and_json(tmp_path, capsys):
    bench = load_benchmark()
    # 1e-5 GiB fits the official [B, B, D] fp16 broadcast at B=8 (6 KiB) but not at B=16 (24 KiB).
    report = bench.main(["--batch_sizes", "8", "16", "--dims", "48", "--repeats", "1", "--max_memory_gb", "1e-5",
                         "--no_progress", "--output", str(tmp_path / "speed")])
    out = capsys.readouterr().out

    for title in ("Linear assignment, ms per call", "Mean pair-distance reduction", "KNN (nearest of k)",
                  "Distance matrix against a plain", "Targets"):
        assert title in out
    rows = [line for line in out.splitlines() if line.startswith("| 8 | 48 |") or line.startswith("| 16 | 48 |")]
    assert len(rows) == 8  # two sizes in each of the four tables
    linear_16 = next(line for line in out.splitlines() if line.startswith("| 16 | 48 |"))
    assert "OOM (needs 2.3e-05 GiB)" in linear_16
    linear_8 = next(line for line in out.splitlines() if line.startswith("| 8 | 48 |"))
    assert "OOM" not in linear_8 and linear_8.count("|") == 10

    assert "| linear fp32 reaches scipy's exact optimum at every size measured | all sizes | PASS |" in out
    assert "NOT MEASURED" in out  # the target sizes are not in this run, and the block says so
    assert "`--assignment_cost_dtype auto` (the trainers' default) uses " in out
    statuses = {t["status"] for t in report["targets"]}
    assert statuses <= {"PASS", "FAIL", "NOT MEASURED", "info"}

    assert (tmp_path / "speed.md").read_text().strip() == out.strip()
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert [(r["batch"], r["dim"]) for r in saved["results"]] == [(8, 48), (16, 48)]
    small = saved["results"][0]
    assert small["linear"]["float32"]["total_cost_gap"] <= 1e-6 and small["linear"]["float32"]["same_permutation"]
    assert 0.0 < small["exact_reduction"] < 1.0
    assert saved["results"][1]["linear"]["official"]["oom"] is True
