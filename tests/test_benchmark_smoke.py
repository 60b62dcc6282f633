"""The assignment speed and UNet step cost benchmarks run end to end at a tiny size and print the tables they
promise."""

import importlib.util
import json
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name="assignment_speed"):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_prints_every_table_marks_oom_and_writes_md_and_json(tmp_path, capsys):
    bench = load_benchmark()
    # 1e-5 GiB fits the official [B, B, D] fp16 broadcast at B=8 (6 KiB) but not at B=16 (24 KiB).
    report = bench.main(["--batch_sizes", "8", "16", "--dims", "48", "--scaling_batch_sizes", "8", "16",
                         "--scaling_dims", "48", "--repeats", "1", "--max_memory_gb", "1e-5",
                         "--no_progress", "--output", str(tmp_path / "speed")])
    out = capsys.readouterr().out

    for title in ("Linear assignment, ms per call", "Mean pair-distance reduction", "KNN (nearest of k)",
                  "Distance matrix against a plain", "Scaling: linear assignment of real digits", "Exact solvers on",
                  "Targets"):
        assert title in out
    rows = [line for line in out.splitlines() if line.startswith("| 8 | 48 |") or line.startswith("| 16 | 48 |")]
    assert len(rows) == 10  # two sizes in each of the four tables and in the scaling table
    scaling_16 = [line for line in out.splitlines() if line.startswith("| 16 | 48 |")][-1]
    assert "OOM (needs 2.3e-05 GiB)" in scaling_16
    solvers = [row for row in report["solvers"] if row["kind"] == "digits"]
    assert [row["batch"] for row in solvers] == [8, 16] and set(solvers[0]["solvers"]) == {"lapcpp", "lap", "scipy"}
    assert all(abs(entry["gap"]) <= 1e-6 for row in report["solvers"] for entry in row["solvers"].values())
    assert "same optimum as scipy" in out and "| digits vs noise, D=48 | 16 |" in out
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


def test_unet_step_cost_times_each_shape_side_by_side_and_writes_md_and_json(tmp_path, capsys):
    bench = load_benchmark("unet_step_cost")
    report = bench.main(["--quick", "--threads", "1", "--output", str(tmp_path / "cost")])
    out = capsys.readouterr().out

    assert "forward + backward + fused AdamW" in out and "1 torch threads" in out
    names = [name for name, _ in bench.SHAPES[1:3]]
    assert [row["shape"] for row in report["rows"]] == names
    demo = next(row for row in report["rows"] if row["shape"].startswith("MNIST_DEMO_UNET"))
    assert 0.6e6 < demo["parameters"] < 0.7e6  # the preset's documented size
    assert report["rows"][0]["ratio_to_first"] == 1.0
    for row in report["rows"]:
        assert 0 < row["ms_min"] <= row["ms_median"] <= row["ms_max"]
        assert f"| {row['shape']} | {row['parameters'] / 1e6:.2f}M | 4 |" in out
    updates = report["updates"]
    assert [row["update"] for row in updates] == [name for name, _ in bench.UPDATES]
    assert {row["shape"] for row in updates} == {names[-1]}
    loading = report["loading"]
    assert [row["loader"] for row in loading] == bench.LOADERS and report["preparation"]["images"] == 2000
    assert "Loading a batch of the bundled MNIST at 16 px" in out and "Resizing the 2,000 digits once took" in out
    for row in loading:
        assert 0 < row["ms_min"] <= row["ms_median"] <= row["ms_max"]
        assert f"| {row['loader']} | 4 | {row['ms_median']:.2f} |" in out
    assert [row["ratio_to_first"] for row in updates if "a loop over tensors" in row["update"]] == [1.0, 1.0]
    assert all(f"| {row['update']} | {row['ms_median']:.2f} |" in out for row in updates)
    assert (tmp_path / "cost.md").read_text().strip() == out.strip()
    assert json.loads((tmp_path / "cost.json").read_text())["rows"] == report["rows"]


def test_demo_sampler_check_scores_every_method_with_every_sampler(tmp_path):
    """benchmarks/demo_samplers.py on two tiny saved models (no training): one evaluate run per score, kept,
    vanilla's matched sampler scored as its independent one, a table per sampler."""
    import torch
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    from immiscible_pipeline import TrainingCoupling

    module = load_benchmark("demo_samplers")
    work = tmp_path / "work"
    for name in ("none", "linear"):
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                           layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
        folder = work / f"ddim-{name}-seed0"
        DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=50)).save_pretrained(folder)
        TrainingCoupling(method=name, group_size=4).save(str(folder))
    argv = ["--family", "ddim", "--methods", "none", "linear", "--samplers", "ddim-2", "ddpm-2", "ddpm-2-matched",
            "--num_samples", "8", "--num_reference", "40", "--classifier_steps", "20", "--work_dir", str(work),
            "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")]
    result = module.main(argv)
    scores = result["scores"]
    assert scores["none/seed0/ddpm-2-matched"] == scores["none/seed0/ddpm-2"]  # nothing to match
    assert scores["linear/seed0/ddpm-2-matched"]["renoise"] == "matched"
    assert scores["linear/seed0/ddpm-2-matched"]["fid"] != scores["linear/seed0/ddpm-2"]["fid"]
    assert scores["linear/seed0/ddim-2"]["scheduler"] == "DDIMScheduler"
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| DDPM ancestral, 2 steps, matched re-noising |" in table and "linear: readable" in table
    assert (tmp_path / "out" / "fid_by_sampler.png").read_bytes()[:4] == b"\x89PNG"
    kept = sorted(p.name for p in (work / "scores").glob("*.json"))
    assert len(kept) == 5  # 3 samplers for linear, 2 for vanilla (its matched one is its independent one)
    assert module.main(argv)["scores"] == scores  # read back, not sampled again
