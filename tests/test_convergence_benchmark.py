"""The convergence benchmark: smoke runs of both families (a few steps, one seed), the reading of its curves per
sampler step count (immiscible_pipeline.evaluation.fid_curves, which `compare` shares), the converged? check, and
the command it gives the real trainer."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import pathlib
import subprocess
import sys

import pytest

from immiscible_pipeline.evaluation import fid_curves

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def convergence():
    spec = importlib.util.spec_from_file_location("convergence", os.path.join(REPO, "benchmarks", "convergence.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["convergence"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_first_reach_interpolates_between_evaluations():
    curve = [{"step": 100, "fid": 50.0}, {"step": 200, "fid": 30.0}, {"step": 300, "fid": 10.0}]
    assert fid_curves.first_reach(curve, 20.0) == pytest.approx(250.0)
    assert fid_curves.first_reach(curve, 60.0) == 100.0
    assert fid_curves.first_reach(curve, 5.0) is None
    bumpy = [{"step": 1, "fid": 9.0}, {"step": 2, "fid": 12.0}, {"step": 3, "fid": 9.5}]
    assert fid_curves.first_reach(bumpy, 9.5) == 1.0  # the first time, not the last


def test_speed_up_at_equal_fid_counts_slower_methods_too():
    def run(method, seed, fids):
        curve = [{"step": 100 * (i + 1), "fid": f} for i, f in enumerate(fids)]
        return {"method": method, "seed": seed, "curve": curve,
                "step_ms_median": 1.0, "noise_ms_median": 0.1}
    runs = [run("none", 0, [40, 20, 10]), run("linear", 0, [30, 10, 8]), run("knn", 0, [45, 30, 20])]
    summary = fid_curves.summarise(runs, ["none", "linear", "knn"], [0])
    assert summary["reach"]["linear"][0] == pytest.approx(200.0) and summary["ratio"]["linear"] == [1.5]
    assert summary["reach"]["knn"][0] is None and summary["unreached"]["knn"] == [0]
    # knn ends at FID 20, which vanilla reached at step 200: two thirds of knn's 300 steps.
    assert summary["equal_fid"]["knn"] == [pytest.approx(2 / 3)] and summary["equal_fid"]["linear"] == [1.5]
    assert summary["equal_fid"]["none"] == [1.0]
    diverged = fid_curves.summarise(runs[:2] + [run("knn", 0, [45, 30, float("nan")])], ["none", "linear", "knn"], [0])
    assert diverged["equal_fid"]["knn"] == [] and diverged["unreached"]["knn"] == [0]


def test_verdict_names_a_gain_or_loss_only_where_the_t_interval_excludes_one():
    low, high = fid_curves.mean_interval([1.36, 1.44, 1.40])
    # mean 1.40, std 0.04, t(0.975, 2) = 4.303: half-width 4.303 * 0.04 / sqrt(3) = 0.0994
    assert (low, high) == (pytest.approx(1.40 - 0.0994, abs=1e-3), pytest.approx(1.40 + 0.0994, abs=1e-3))
    assert fid_curves.verdict((low, high)) == "faster"
    assert fid_curves.verdict(fid_curves.mean_interval([0.50, 0.43, 0.47])) == "slower"
    assert fid_curves.verdict(fid_curves.mean_interval([1.36, 0.80])) == "no clear difference"
    assert fid_curves.mean_interval([1.4]) is None and fid_curves.verdict(None) == "too few seeds"


def test_a_vanilla_curve_that_only_worsens_makes_the_speed_up_not_measurable():
    def run(method, seed, fids):
        curve = [{"step": 100 * (i + 1), "fid": f} for i, f in enumerate(fids)]
        return {"method": method, "seed": seed, "curve": curve}
    # Vanilla's final FID (50) is already met at its first evaluation, so every ratio is capped at 1 by the
    # evaluation grid although linear is better everywhere.
    worsening = [run("none", s, [40, 45, 50]) for s in (0, 1)] + [run("linear", s, [20, 19, 18 + s]) for s in (0, 1)]
    summary = fid_curves.summarise(worsening, ["none", "linear"], [0, 1])
    assert summary["equal_fid"]["linear"] == [1.0, 1.0]
    assert summary["verdict"]["linear"] == fid_curves.UNMEASURABLE
    improving = [run("none", s, [40, 30, 20]) for s in (0, 1)] + [run("linear", s, [40, 30, 20]) for s in (0, 1)]
    assert fid_curves.summarise(improving, ["none", "linear"], [0, 1])["verdict"]["linear"] == "no clear difference"


def curve_run(method, seed, curves, step=100):
    """A finished run with synthetic FID curves {sampler steps: [FID per evaluation]}."""
    return {"method": method, "seed": seed, "step_ms_median": 1.0, "noise_ms_median": 0.1, "wall_seconds": 1.0,
            "curves": {str(n): [{"step": step * (i + 1), "fid": f, "kid_mean": 0.0, "kid_std": 0.0}
                                for i, f in enumerate(fids)] for n, fids in curves.items()}}


def test_speed_ups_and_convergence_are_read_per_sampler_step_count():
    # At 1 sampler step linear gets to vanilla's final FID in half the steps; at 2 steps it never does.
    runs = [curve_run("none", 0, {1: [40, 30, 20, 10], 2: [20, 16, 12, 11.5]}),
            curve_run("none", 1, {1: [44, 32, 22, 12], 2: [22, 17, 13, 12.5]}),
            curve_run("linear", 0, {1: [30, 10, 9, 8], 2: [25, 20, 18, 16]}),
            curve_run("linear", 1, {1: [33, 12, 10, 9], 2: [26, 21, 19, 17]})]
    summaries = fid_curves.summarise_by_sampler(runs, ["none", "linear"], [0, 1], [1, 2])
    assert list(summaries) == [1, 2]
    one, two = summaries[1], summaries[2]
    assert one["steps"] == [100, 200, 300, 400]
    assert one["reach"]["linear"] == {0: pytest.approx(200.0), 1: pytest.approx(200.0)}
    assert one["ratio"]["linear"] == [pytest.approx(2.0), pytest.approx(2.0)]
    assert two["reach"]["linear"] == {0: None, 1: None} and two["ratio"]["linear"] == []
    # linear ends at 16 (seed 0): vanilla reached 16 at step 200 of linear's 400 -> a slow-down of 0.5.
    assert two["equal_fid"]["linear"][0] == pytest.approx(0.5)
    # Vanilla's mean curve at 1 step: 31 at step 200 (the half-way point) -> 11 at step 400: still improving.
    assert one["converged"]["fid_half"] == pytest.approx(31.0) and one["converged"]["fid_end"] == pytest.approx(11.0)
    assert one["converged"]["converged"] is False
    # ... at 2 steps: 16.5 -> 12, 27% better over the last doubling: not converged either.
    assert two["converged"]["improvement"] == pytest.approx(1 - 12 / 16.5)
    assert set(one["converged_per_seed"]) == {0, 1}


def test_converged_means_less_than_ten_percent_better_over_the_last_doubling():
    steps = [250, 500, 1000, 2000, 4000]
    flat = fid_curves.convergence_check(steps, [50, 20, 12, 10.0, 9.5])
    assert flat["fid_half"] == 10.0 and flat["improvement"] == pytest.approx(0.05) and flat["converged"] is True
    assert flat["previous_improvement"] == pytest.approx(1 - 10 / 12)
    still = fid_curves.convergence_check(steps, [50, 20, 12, 10.0, 8.5])
    assert still["converged"] is False and still["improvement"] == pytest.approx(0.15)
    line = fid_curves.describe_convergence(still)
    assert "converged? no" in line and "15.0% better over the last doubling" in line and "5.0 points above" in line
    assert "converged? yes" in fid_curves.describe_convergence(flat)
    worse = fid_curves.convergence_check(steps, [50, 20, 12, 10.0, 11.0])  # got worse: it has levelled off
    assert worse["converged"] is True and worse["improvement"] < 0
    assert "10.0% worse over the last doubling" in fid_curves.describe_convergence(worse)
    # The half-way point interpolated between evaluations (1500 between 1000 and 2000 steps).
    between = fid_curves.convergence_check([1000, 2000, 3000], [30.0, 20.0, 19.0])
    assert between["fid_half"] == pytest.approx(25.0) and between["fid_quarter"] is None
    unknown = fid_curves.convergence_check([3000, 4000], [20.0, 19.0])  # nothing evaluated at 2000
    assert unknown["converged"] is None and "unknown" in fid_curves.describe_convergence(unknown)


def test_evaluation_schedule_is_dense_early_and_holds_every_doubling(convergence):
    assert convergence.Settings(steps=4000, eval_every=1000).eval_steps() == [250, 500, 1000, 2000, 3000, 4000]
    assert convergence.Settings(steps=4000, eval_every=500).eval_steps() == [250, 500, 1000, 1500, 2000, 2500,
                                                                             3000, 3500, 4000]
    assert convergence.Settings(steps=1000, eval_every=250).eval_steps() == [125, 250, 500, 750, 1000]
    assert convergence.Settings(steps=6, eval_every=3).eval_steps() == [3, 6]


def test_methods_expand_to_one_run_per_k_and_bad_names_are_refused(convergence, capsys):
    assert convergence.method_names(["none", "linear", "knn"], [2, 4, 8]) == ["none", "linear", "knn2", "knn4", "knn8"]
    assert convergence.method_names(["none", "knn4", "knn"], [4]) == ["none", "knn4"]
    assert convergence.parse_method("knn16") == ("knn", 16) and convergence.parse_method("linear") == ("linear", 1)
    with pytest.raises(SystemExit):
        convergence.parse_args(["--methods", "none", "sinkhorn"])
    assert "unknown method 'sinkhorn'" in capsys.readouterr().err
    cm = convergence.build_settings(convergence.parse_args(["--family", "cm"]))
    ddim = convergence.build_settings(convergence.parse_args([]))
    assert (cm.eval_inference_steps, ddim.eval_inference_steps) == ([1, 2], [5, 10, 25, 50])
    assert cm.learning_rate == 1e-3 and cm.unet["dropout"] == 0.0 and cm.recipe["curriculum_end"] == 1280
    assert cm.key() != convergence.build_settings(convergence.parse_args(["--family", "cm", "--steps", "2000"])).key()


def test_script_backend_gives_the_cm_trainer_the_loops_settings(convergence, tmp_path):
    from trainer_runs import load_script

    trainer = load_script(pathlib.Path(REPO) / "train_immiscible_cm.py")
    settings = convergence.build_settings(convergence.parse_args(["--family", "cm"]))
    command = convergence.script_command("knn4", 3, settings, str(tmp_path / "run"), str(tmp_path / "unet.json"))
    assert command[1].endswith("train_immiscible_cm.py")
    args = trainer.parse_args(command[2:])
    assert (args.immiscible, args.immiscible_k, args.seed) == ("knn", 4, 3)
    assert (args.train_batch_size, args.max_train_steps, args.learning_rate) == (64, 4000, 1e-3)
    assert (args.adam_beta1, args.adam_weight_decay, args.dropout, args.lr_warmup_steps) == (0.9, 0.0, 0.0, 100)
    assert args.consistency == convergence.ConsistencyRecipe(**settings.recipe)
    assert args.eval_inference_steps == [1, 2] and args.eval_num_samples == 2000 and args.eval_steps == 500


@pytest.mark.parametrize("family", ["ddim", "flow"])
def test_script_backend_gives_the_ddim_and_flow_trainers_the_loops_objective(convergence, family, tmp_path):
    from trainer_runs import load_script

    trainer = load_script(pathlib.Path(REPO) / convergence.TRAINERS[family])
    settings = convergence.build_settings(convergence.parse_args(["--family", family]))
    command = convergence.script_command("linear", 1, settings, str(tmp_path / "run"), str(tmp_path / "unet.json"))
    args = trainer.parse_args(command[2:])
    assert args.eval_inference_steps == settings.eval_inference_steps and args.learning_rate == settings.learning_rate
    objective = convergence.make_objective(settings)
    if family == "ddim":  # the loop's epsilon objective on linear betas, not the MNIST demo's
        assert (args.prediction_type, args.ddpm_beta_schedule, args.snr_gamma) == ("epsilon", "linear", None)
        assert objective.noise_scheduler.config.prediction_type == "epsilon" and objective.snr_gamma is None
    else:
        assert (args.weighting_scheme, args.logit_mean, args.logit_std) == (objective.weighting_scheme, 0.0, 1.0)


@pytest.mark.parametrize("family, names, sampler_steps", [("ddim", ["none", "linear", "knn8"], ["1", "2"]),
                                                         ("cm", ["none", "linear", "knn4"], ["1", "2"])])
def test_smoke_run_writes_tables_per_sampler_step_count_plot_and_reusable_runs(convergence, tmp_path, capsys, family,
                                                                               names, sampler_steps):
    out = tmp_path / "out"
    args = ["--family", family, "--smoke", "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache")]
    result = convergence.main(args)

    assert result["seeds"] == [0] and result["methods"] == names and result["family"] == family
    assert {(r["method"], r["seed"]) for r in result["runs"]} == {(name, 0) for name in names}
    for run in result["runs"]:
        assert sorted(run["curves"]) == sampler_steps
        for curve in run["curves"].values():
            assert [p["step"] for p in curve] == [3, 6]
            assert all(math.isfinite(p["fid"]) and math.isfinite(p["kid_mean"]) for p in curve)
        assert run["step_ms_median"] > 0 and run["noise_ms_median"] > 0
        assert 0 < run["cpu_seconds"]  # the machine time a run took, which a paused run's wall clock overstates
        assert run["machine"].endswith(", 1 torch threads")  # the smoke run's threads, kept with its timings
    # Different sampler step counts sample differently: the curves are not copies of each other.
    assert result["runs"][0]["curves"]["1"][0]["fid"] != result["runs"][0]["curves"]["2"][0]["fid"]
    table = (out / "results.md").read_text()
    heading = "DDIM-{}" if family == "ddim" else "{}-step consistency sampling"
    assert f"## {heading.format(1)}" in table and f"## {heading.format(2)}" in table
    assert table.count(f"| step | {' | '.join(names)} |") == 2 and "| 3 |" in table and "| 6 |" in table
    assert table.count("Speed-up at equal FID") == 2 and "noise call share" in table
    assert table.count("converged? ") >= 4 and "torch threads" in table
    assert "CPU time of the 3 run(s) that record it" in table
    assert ("curriculum depends on the total steps" in table) == (family == "cm")
    assert (out / "fid_vs_steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved["classifier_test_accuracy"] is not None and len(list((out / "runs").glob("*.json"))) == 3
    assert set(saved["summary"]) == set(sampler_steps)

    # Same settings again: the finished runs are reused, not retrained, and their timings keep naming the
    # threads they ran with, not this invocation's.
    capsys.readouterr()
    again = convergence.main(args + ["--threads", "2"])
    assert capsys.readouterr().out.count("reusing") == 3
    assert [r["curves"] for r in again["runs"]] == [r["curves"] for r in result["runs"]]
    timing_line = next(line for line in (out / "results.md").read_text().splitlines() if "Wall-clock per" in line)
    assert "1 torch threads" in timing_line and "2 torch threads" not in timing_line


def test_results_default_to_a_committed_folder(convergence):
    assert convergence.default_output_dir("cm") == os.path.join(REPO, "docs", "convergence", "cm")
    folder = os.path.join(convergence.default_output_dir("cm"), "runs")
    ignored = subprocess.run(["git", "check-ignore", "-q", os.path.join(folder, "none-seed0-abc.json")], cwd=REPO)
    assert ignored.returncode == 1  # not ignored: finished runs are committed and reused by later sessions


def test_reevaluation_scores_kept_weights_with_other_samplers_without_training_again(convergence, tmp_path, capsys):
    """The sampler study: runs keep their weights, and --reevaluate scores them per sampler (matched re-noising
    included), resumably, then writes its own tables."""
    out, work = tmp_path / "out", tmp_path / "work"
    common = ["--family", "ddim", "--smoke", "--methods", "none", "linear", "--output_dir", str(out), "--work_dir",
              str(work), "--cache_dir", str(tmp_path / "cache")]
    trained = convergence.main(common + ["--no_train_eval"])
    assert all(not curve for run in trained["runs"] for curve in run["curves"].values())  # no FID while training
    # filed with the sampler study, apart from the evaluated runs that `compare <output_dir>/runs` reads
    assert len(list((out / "samplers" / "runs").glob("*.json"))) == 2 and not (out / "runs").exists()
    kept = sorted(path.name for path in work.glob("*/weights/*.safetensors"))
    assert kept == ["step-000003.safetensors"] * 2 + ["step-000006.safetensors"] * 2
    capsys.readouterr()
    samplers = ["ddim-2", "ddpm-2", "ddpm-2-matched", "ddpm-2-matched1"]
    result = convergence.main(common + ["--no_train_eval", "--reevaluate", *samplers, "--reeval_samples", "12"])
    output = capsys.readouterr().out
    assert output.count("reusing") == 2 and "seed 0: training" not in output
    curves = result["curves"]["linear-seed0"]
    assert sorted(curves) == sorted(samplers) and [p["step"] for p in curves["ddpm-2"]] == [3, 6]
    assert curves["ddpm-2"][-1]["fid"] != curves["ddpm-2-matched"][-1]["fid"]  # the coupling changed the samples
    # Vanilla has no coupling to match: its matched scores are its independent ones, taken over, not sampled again.
    vanilla = result["curves"]["none-seed0"]
    assert [p["fid"] for p in vanilla["ddpm-2-matched"]] == [p["fid"] for p in vanilla["ddpm-2"]]
    assert all(p["same_as"] == "ddpm-2" for p in vanilla["ddpm-2-matched"] + vanilla["ddpm-2-matched1"])
    assert not re.search(r"none-seed0\S* step +\d+ ddpm-2-matched", output)
    assert re.search(r"linear-seed0\S* step +\d+ ddpm-2-matched", output)
    table = (out / "samplers" / "results.md").read_text()
    assert "| DDPM ancestral, 2 steps, matched re-noising (first 1) |" in table and "12 samples" in table
    assert (out / "samplers" / "fid_vs_steps.png").read_bytes()[:4] == b"\x89PNG"
    # Scores are kept as they are made: a second invocation samples nothing.
    convergence.main(common + ["--no_train_eval", "--reevaluate", "ddpm-2", "--reeval_samples", "12"])
    assert not re.search(r"step +\d+ ddpm-2 +FID", capsys.readouterr().out)
    # One method's runs alone (added to finished vanilla ones later): their scores, no speed-up to compute.
    alone = ["--family", "ddim", "--smoke", "--methods", "linear", "--output_dir", str(out), "--work_dir", str(work),
             "--cache_dir", str(tmp_path / "cache")]
    convergence.main(alone + ["--no_train_eval", "--reevaluate", "ddpm-2", "--reeval_samples", "12"])
    table = (out / "samplers" / "results.md").read_text()
    assert "| sampler | linear |" in table and "Not computed: this invocation holds no vanilla runs" in table
    vanilla_alone = [("none" if arg == "linear" else arg) for arg in alone]
    convergence.main(vanilla_alone + ["--no_train_eval", "--reevaluate", "ddpm-2", "--reeval_samples", "12"])
    table = (out / "samplers" / "results.md").read_text()
    assert "| sampler | none |" in table and "holds vanilla runs only" in table and "|  |" not in table
    with pytest.raises(ValueError, match="does not sample the ddim family"):
        convergence.main(common + ["--no_train_eval", "--reevaluate", "cm-2"])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["ddim", "cm", "flow"])
def test_the_benchmark_loop_reaches_the_trainers_weights(convergence, family, tmp_path):
    """The benchmark's evidence is about the shipped trainers: from the same seed, its loop and the trainer
    (in this process, with the benchmark's flags) end a few linear-assignment steps with identical EMA weights."""
    from safetensors.torch import load_file
    from trainer_runs import load_script, run_in_process

    settings = convergence.build_settings(convergence.parse_args(["--family", family, "--steps", "4",
                                                                  "--batch_size", "8"]))
    settings.unet, settings.warmup_steps, settings.train_eval = dict(convergence.SMOKE_UNET), 1, False
    if family == "cm":
        settings.unet["dropout"] = 0.0
    unet_config = tmp_path / "unet.json"
    unet_config.write_text(json.dumps({"_class_name": "UNet2DModel", **settings.unet}))
    command = convergence.script_command("linear", 5, settings, str(tmp_path / "trainer"), str(unet_config),
                                         evaluate=False)
    argv = [("none" if previous == "--report_to" else item) for previous, item in zip(["", *command], command)]
    run_in_process(load_script(pathlib.Path(command[1])), argv[2:])
    convergence.train_run("linear", 5, settings, convergence.mnist_tensor(settings), evaluator=None,
                          log=lambda text: None, weights_dir=str(tmp_path / "loop"))

    trained = load_file(str(tmp_path / "trainer" / "unet" / "diffusion_pytorch_model.safetensors"))
    looped = load_file(convergence.weights_path(str(tmp_path / "loop"), 4))
    assert trained.keys() == looped.keys()
    start = load_file(convergence.weights_path(str(tmp_path / "loop"), 2))
    assert any(not torch_equal(start[name], looped[name]) for name in looped)  # the weights did move
    for name in trained:
        assert torch_equal(trained[name], looped[name]), (name, (trained[name] - looped[name]).abs().max())


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)
