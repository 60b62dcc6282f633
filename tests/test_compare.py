"""`python -m immiscible_pipeline.compare`: speed-ups at equal FID of run folders with known curves, the refusal of
runs that differ in more than method and seed, clear errors, the convergence benchmark's run files, and two real
tiny trainer runs end to end."""

import json
import math
from pathlib import Path

import pytest

from trainer_runs import load_script, run_in_process

from immiscible_pipeline.compare import main
from immiscible_pipeline.evaluation import run_records

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"dataset": "my flowers", "resolution": 32, "learning_rate": 2e-4, "max_train_steps": 400, "eval_steps": 100,
          "eval_feature": "inception", "eval_num_samples": 2000, "total_batch_size": 64, "train_batch_size": 64,
          "num_processes": 1, "assignment_scope": "auto", "assignment_cost_dtype": "auto", "immiscible_k": 8}


def run_folder(root, name, method, seed, curves, eval_inference_steps=None, k=8, **config):
    """A trainer output folder: training_config.json and eval_history.jsonl with FID `curves` {setting: [FID at
    steps 100, 200, ...]}, a setting being a step count (lines without it: the DDIM trainer's) or (steps, renoise)."""
    folder = Path(root) / name
    folder.mkdir(parents=True)
    settings = {**CONFIG, "immiscible": method, "immiscible_k": k, "seed": seed, "output_dir": str(folder),
                "eval_inference_steps": eval_inference_steps, **config}
    (folder / "training_config.json").write_text(json.dumps(settings))
    lines = []
    for setting, fids in curves.items():
        steps, renoise = setting if isinstance(setting, tuple) else (setting, "independent")
        for i, fid in enumerate(fids):
            sampler = {} if steps is None else {"num_inference_steps": steps}
            lines.append({"step": 100 * (i + 1), **sampler, "renoise": renoise, "fid": fid, "kid_mean": 0.1,
                          "kid_std": 0.01, "num_samples": 2000, "feature": "inception"})
    lines.sort(key=lambda line: line["step"])  # as a trainer writes them: all settings of one step together
    (folder / "eval_history.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(folder)


def rows(result, label):
    return {method: (row["equal_fid"], row["verdict"]) for method, row in result[label]["rows"].items()}


def test_known_curves_give_known_speed_ups_and_verdicts(tmp_path, capsys):
    # DDIM trainer lines (no num_inference_steps: --eval_inference_steps 10 from the config). Per seed, linear
    # reaches vanilla's final FID (10) at step 200 against vanilla's 400: 2.0 in every seed; knn ends at 20, which
    # vanilla reached at step 200 of knn's 400: 0.5. Equal ratios: a zero-width interval that excludes 1.
    runs = []
    for seed, shift in [(0, 0.0), (1, 1.0), (2, -1.0)]:
        for method, fids in [("none", [40, 20, 15, 10]), ("linear", [30, 10, 9, 8]), ("knn", [45, 35, 25, 20])]:
            # the config's count as older trainers wrote it (10) or as they write it now ([10]); sample grids
            # (validation_inference_steps) are bookkeeping, not a difference between runs
            runs.append(run_folder(tmp_path, f"{method}-{seed}", method, seed, {None: [f + shift for f in fids]},
                                   eval_inference_steps=10 if seed == 0 else [10], validation_inference_steps=[seed]))
    result = main([*runs, "--json", str(tmp_path / "out.json"), "--plot", str(tmp_path / "fid.png")])
    assert list(result) == ["10 sampler steps, independent re-noising"]
    found = rows(result, "10 sampler steps, independent re-noising")
    assert found["linear"][0] == [pytest.approx(2.0)] * 3 and found["linear"][1] == "faster"
    assert found["knn8"][0] == [pytest.approx(0.5)] * 3 and found["knn8"][1] == "slower"
    assert found["none"][0] == [1.0] * 3
    table = capsys.readouterr().out
    assert "| linear | 0, 1, 2 | 8 ± 1 | 200, 200, 200 | 2.00, 2.00, 2.00 | 2 ± 0 | 2.00 to 2.00 | faster |" in table
    assert "| knn8 | 0, 1, 2 | 20 ± 1 | never, never, never | 0.50, 0.50, 0.50 |" in table
    assert "converged? no" in table and "FID on inception features, 2000 samples" in " ".join(table.split())
    again = main([str(tmp_path)])  # the folder holding the run folders: the same runs
    assert rows(again, "10 sampler steps, independent re-noising") == found
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["settings"]["10 sampler steps, independent re-noising"]["rows"]["linear"]["verdict"] == "faster"
    assert len(saved["runs"]) == 9
    assert (tmp_path / "fid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_sampler_setting_is_compared_on_its_own_and_vanilla_serves_every_renoising(tmp_path):
    # The CM trainer's lines: 1 and 2 sampler steps; linear evaluated with matched re-noising, vanilla (no coupling
    # to match) recorded as independent. At 1 step linear reaches vanilla's final FID in half the steps in both
    # seeds; at 2 steps it ends worse.
    both = [1, 2]
    runs = [run_folder(tmp_path, "n0", "none", 0, {1: [40, 30, 20, 10], 2: [20, 16, 12, 11]}, both),
            run_folder(tmp_path, "n1", "none", 1, {1: [44, 32, 22, 12], 2: [22, 17, 13, 12]}, both),
            run_folder(tmp_path, "l0", "linear", 0, {(1, "matched"): [30, 10, 9, 8], (2, "matched"): [25, 20, 18, 16]},
                       both),
            run_folder(tmp_path, "l1", "linear", 1, {(1, "matched"): [33, 12, 10, 9], (2, "matched"): [26, 21, 19, 17]},
                       both)]
    result = main(runs)
    assert list(result) == ["1 sampler step, matched re-noising", "2 sampler steps, matched re-noising"]
    one, two = rows(result, "1 sampler step, matched re-noising"), rows(result, "2 sampler steps, matched re-noising")
    assert one["linear"][0] == [pytest.approx(2.0), pytest.approx(2.0)] and one["linear"][1] == "faster"
    # linear ends at 16 (seed 0): vanilla reached 16 at step 200 of linear's 400 -> 0.5; seed 1: 17 at 200 -> 0.5
    assert two["linear"][0] == [pytest.approx(0.5), pytest.approx(0.5)] and two["linear"][1] == "slower"
    assert result["1 sampler step, matched re-noising"]["rows"]["none"]["final_fid"] == [10, 12]


def test_a_method_is_compared_on_the_seeds_it_shares_with_vanilla(tmp_path, capsys):
    runs = [run_folder(tmp_path, name, method, seed, {5: fids}) for name, method, seed, fids in [
        ("n0", "none", 0, [40, 20]), ("n1", "none", 1, [42, 22]), ("l1", "linear", 1, [30, 11]),
        ("l7", "linear", 7, [30, 9])]]
    result = main(runs)
    linear = result["5 sampler steps, independent re-noising"]["rows"]["linear"]
    assert linear["seeds"] == [1] and linear["verdict"] == "too few seeds"
    assert "Note: linear seed(s) 7 left out: no vanilla run of that seed." in capsys.readouterr().out
    # Seed 1: vanilla reaches its final 22 at step 200; linear passes 22 at 100 + 100 * (30 - 22) / (30 - 11).
    assert linear["equal_fid"] == [pytest.approx(200 / (100 + 100 * 8 / 19))]
    with pytest.raises(SystemExit):
        main([runs[0], runs[3]])
    assert "linear has seed(s) 7 and vanilla 0" in capsys.readouterr().err


def test_runs_that_differ_in_more_than_method_and_seed_are_refused_naming_the_key(tmp_path, capsys):
    vanilla = run_folder(tmp_path, "none", "none", 0, {5: [40, 20]})
    faster_lr = run_folder(tmp_path, "linear", "linear", 0, {5: [30, 10]}, learning_rate=1e-3)
    with pytest.raises(SystemExit) as stopped:
        main([vanilla, faster_lr])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "differ only in their method" in error and "learning_rate: 0.0002 (" in error
    assert f"0.001 ({faster_lr})" in error
    # Bookkeeping, the batch's split at an equal total, and the flags vanilla does not use are not differences.
    same = run_folder(tmp_path, "linear-ok", "linear", 0, {5: [30, 10]}, checkpointing_steps=7, report_to="wandb",
                      logging_dir="elsewhere", k=4)
    split = run_folder(tmp_path, "none-split", "none", 1, {5: [40, 20]}, train_batch_size=32, num_processes=2,
                       assignment_scope="global", assignment_cost_dtype="float32")
    assert main([vanilla, same, split])["5 sampler steps, independent re-noising"]["rows"]["linear"]["seeds"] == [0]
    # ... but for linear assignment the group it assigns over is: 2 x 32 assigned globally is not 64 on one process.
    local = run_folder(tmp_path, "linear-local", "linear", 1, {5: [30, 10]}, train_batch_size=32, num_processes=2,
                       assignment_scope="local")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([vanilla, split, same, local])
    assert "assignment: " in capsys.readouterr().err


def test_missing_history_or_vanilla_run_gives_a_clear_error(tmp_path, capsys):
    untracked = tmp_path / "no-eval"
    untracked.mkdir()
    (untracked / "training_config.json").write_text(json.dumps({**CONFIG, "immiscible": "none", "seed": 0}))
    with pytest.raises(SystemExit):
        main([str(untracked)])
    error = capsys.readouterr().err
    assert f"{untracked} holds no eval_history.jsonl" in error and "--eval_steps" in error
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nowhere")])
    assert "no such run folder" in capsys.readouterr().err
    linear = run_folder(tmp_path, "linear", "linear", 0, {5: [30, 10]})
    with pytest.raises(SystemExit):
        main([linear])
    assert "no vanilla run (--immiscible none)" in capsys.readouterr().err
    # The trainers and compare agree on the history's name.
    from immiscible_pipeline.training.checkpoints import EVAL_HISTORY

    assert run_records.EVAL_HISTORY == EVAL_HISTORY


def test_a_resumed_runs_history_counts_its_last_evaluation_of_each_step(tmp_path):
    vanilla = run_folder(tmp_path, "none", "none", 0, {5: [40, 20]})
    linear = run_folder(tmp_path, "linear", "linear", 0, {5: [30, 10]})
    with open(Path(linear) / "eval_history.jsonl", "a") as history:  # resumed from step 100: step 200 again
        history.write(json.dumps({"step": 200, "num_inference_steps": 5, "renoise": "independent", "fid": 25.0}) + "\n")
    found = main([vanilla, linear])["5 sampler steps, independent re-noising"]["rows"]["linear"]
    assert found["final_fid"] == [25.0] and found["reach"] == [None]


def test_the_convergence_benchmarks_run_files_are_read(capsys):
    runs = REPO / "docs" / "convergence" / "ddim" / "runs"
    result = main([str(runs)])
    assert list(result) == ["5 sampler steps", "10 sampler steps", "25 sampler steps", "50 sampler steps"]
    five = result["5 sampler steps"]["rows"]
    assert list(five) == ["none", "linear", "knn8"] and five["linear"]["seeds"] == [0, 1, 2]
    # The benchmark's own results.md says the same (it is written by the same code)
    committed = (runs.parent / "results.md").read_text()
    low, high = five["linear"]["interval"]
    assert f"{low:.2f} to {high:.2f} | {five['linear']['verdict']} |" in committed
    assert five["knn8"]["verdict"] == "slower"
    assert main([str(runs.parent)])["5 sampler steps"]["rows"]["linear"]["equal_fid"] == five["linear"]["equal_fid"]
    # Files given one by one work too; a run of other settings (another key in its name) is refused.
    single = sorted(runs.glob("*seed0*.json"))
    assert list(main([str(path) for path in single])["5 sampler steps"]["rows"]) == ["none", "linear", "knn8"]
    other = REPO / "docs" / "convergence" / "cm" / "runs" / "linear-seed0-3babf420e1ed.json"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([str(path) for path in single] + [str(other)])
    assert "benchmark settings: " in capsys.readouterr().err


def test_two_real_consistency_trainer_runs_compare_end_to_end(tiny_imagefolder, tiny_unet_config_path, tmp_path,
                                                             monkeypatch):
    monkeypatch.setenv("IMMISCIBLE_CACHE", str(tmp_path / "eval-cache"))
    trainer = load_script(REPO / "train_immiscible_cm.py")
    folders = []
    for method in ("none", "linear"):
        folder = tmp_path / method
        run_in_process(trainer, [
            "--train_data_dir", str(tiny_imagefolder), "--model_config_name_or_path", str(tiny_unet_config_path),
            "--output_dir", str(folder), "--cache_dir", str(tmp_path / "datasets-cache"), "--train_batch_size", "4",
            "--num_validation_images", "4", "--seed", "0", "--immiscible", method, "--max_train_steps", "2",
            "--checkpointing_steps", "100", "--validation_steps", "100", "--report_to", "none", "--eval_steps", "1",
            "--eval_feature", "inception", "--eval_num_samples", "4", "--eval_num_reference", "6",
            "--eval_inference_steps", "1"])
        folders.append(str(folder))
    result = main(folders)
    # The CM trainer names each line's sampler: linear's with matched re-noising, vanilla's independent (each FID at
    # 2048-d costs seconds: one sampler setting only).
    assert list(result) == ["1 sampler step, matched re-noising"]
    for setting in result.values():
        assert setting["steps"] == [1, 2] and list(setting["rows"]) == ["none", "linear"]
        assert all(math.isfinite(fid) for row in setting["rows"].values() for fid in row["final_fid"])
        assert setting["rows"]["linear"]["verdict"] == "too few seeds"
