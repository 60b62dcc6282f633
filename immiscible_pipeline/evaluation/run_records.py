"""The runs `python -m immiscible_pipeline.compare` reads, and the check that they differ only in method and seed.

A run is either a trainer's output folder (train_immiscible_ddim.py, train_immiscible_cm.py, ... run with
--eval_steps: `eval_history.jsonl`, one line per evaluation, and `training_config.json`, the run's flags) or one of
the convergence benchmark's run files (`docs/convergence/<family>/runs/<method>-seed<seed>-<settings key>.json`).

What two runs may differ in besides method and seed (everything else must be equal, or they are refused):
- BOOKKEEPING: where a run writes, logs, publishes and checkpoints, how it loads data, memory savers that compute
  the same thing, and what it ended at (global_step; max_train_steps is compared);
- BATCH_LAYOUT: how the batch is split over processes and accumulation steps; their product, total_batch_size,
  is compared, and for linear assignment so is the assignment group (the per-process batch, or the global one);
- the method's own flags (METHOD_FLAGS) name the method, and are compared between runs of one method only, where
  that method uses them (assignment scope and cost precision for linear, k for KNN);
- SAMPLER_FLAGS: which sampler settings were evaluated; every history line records its own, and each setting is
  compared on its own.
Everything else (learning rate, schedule, steps, model, data, precision, evaluation features and sample counts,
...) is compared. A flag one run records and another does not counts as a difference.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

EVAL_HISTORY = "eval_history.jsonl"  # the name training/checkpoints.py writes (evaluation/ does not import training/)
TRAINING_CONFIG = "training_config.json"

BOOKKEEPING = frozenset({
    "output_dir", "logging_dir", "cache_dir", "report_to", "tracker_project_name", "push_to_hub", "hub_model_id",
    "hub_token", "hub_private_repo", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
    "overwrite_output_dir", "validation_steps", "validation_epochs", "num_validation_images", "save_images_epochs",
    "ddim_num_inference_steps", "validation_inference_steps", "dataloader_num_workers",
    "enable_xformers_memory_efficient_attention", "gradient_checkpointing", "global_step"})
BATCH_LAYOUT = frozenset({"train_batch_size", "gradient_accumulation_steps", "num_processes"})
METHOD_FLAGS = frozenset({"immiscible", "immiscible_k", "assignment_scope", "assignment_cost_dtype"})
SAMPLER_FLAGS = frozenset({"eval_inference_steps", "renoise"})
NOT_COMPARED = BOOKKEEPING | BATCH_LAYOUT | METHOD_FLAGS | SAMPLER_FLAGS | {"seed"}

BENCHMARK_RUN = re.compile(r"(?P<method>none|linear|knn\d+)-seed(?P<seed>\d+)-(?P<key>[0-9a-f]+)(?P<script>-script)?")


class SamplerSetting(NamedTuple):
    """How an evaluation sampled: its step count and its re-noising (None where the record does not say)."""
    steps: int | str | None
    renoise: str | None = None

    def describe(self) -> str:
        steps = ("the trainer's sampler" if self.steps is None else
                 f"{self.steps} sampler step{'s' if self.steps != 1 else ''}" if isinstance(self.steps, int) else
                 f"sampler {self.steps}")
        return steps if self.renoise is None else f"{steps}, {self.renoise} re-noising"

    def sort_key(self):
        return (isinstance(self.steps, str), self.steps if isinstance(self.steps, int) else 0, str(self.steps),
                self.renoise or "")


@dataclass
class RunRecord:
    source: str  # the folder or file, as named in messages
    method: str  # none, linear or knn<k>
    seed: int
    config: dict  # what every run must share
    method_config: dict  # what the runs of this method must share
    curves: dict = field(default_factory=dict)  # {SamplerSetting: [evaluation, ...] in step order}
    measured_with: str = ""  # the FID's features and sample count, where recorded


def read_runs(paths: list[str]) -> list[RunRecord]:
    """Every run named by `paths`: trainer output folders (or a folder of them), benchmark run files, or folders
    of run files (a benchmark output folder stands for its runs/)."""
    runs = []
    for path in map(Path, paths):
        if path.is_file():
            runs.append(read_benchmark_run(path))
        elif not path.is_dir():
            raise FileNotFoundError(f"{path}: no such run folder or run file")
        elif is_trainer_run(path):
            runs.append(read_trainer_run(path))
        elif any(is_trainer_run(child) for child in path.iterdir()):  # a folder of run folders
            runs += [read_trainer_run(child) for child in sorted(path.iterdir()) if is_trainer_run(child)]
        elif sorted(path.glob("*.json")) or (path / "runs").is_dir():
            folder = path / "runs" if (path / "runs").is_dir() else path  # docs/convergence/<family>: its runs/
            runs += [read_benchmark_run(file) for file in sorted(folder.glob("*.json"))]
        else:
            raise FileNotFoundError(
                f"{path} holds no {EVAL_HISTORY}: compare reads the FID-versus-steps curve a trainer records when run "
                "with --eval_steps N (for example --eval_steps 500); train with --eval_steps, then compare its "
                "output folder")
    if not runs:
        raise ValueError("no runs given")
    return runs


def is_trainer_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).is_file() for name in (EVAL_HISTORY, TRAINING_CONFIG,
                                                                          "model_index.json"))


def read_trainer_run(folder: Path) -> RunRecord:
    history, config_file = folder / EVAL_HISTORY, folder / TRAINING_CONFIG
    if not history.is_file():
        raise FileNotFoundError(
            f"{folder} holds no {EVAL_HISTORY}: this run was trained without --eval_steps, so it recorded no FID "
            "curve. Train it again with --eval_steps N (for example --eval_steps 500; --eval_feature and "
            "--eval_num_samples choose how FID is measured)")
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} holds no {TRAINING_CONFIG}: the trainer writes it when the run ends; let "
                                "the run finish (or resume it with --resume_from_checkpoint latest) before comparing")
    config = json.loads(config_file.read_text())
    if config.get("immiscible") not in ("none", "linear", "knn"):
        raise ValueError(f"{config_file} records no --immiscible none / linear / knn: not a run of this project's "
                         "trainers")
    method = "knn" + str(config["immiscible_k"]) if config["immiscible"] == "knn" else config["immiscible"]
    if config.get("seed") is None:
        raise ValueError(f"{config_file} records no seed")
    default_steps = config.get("eval_inference_steps")  # older DDIM trainer lines do not name their step count
    if isinstance(default_steps, list):  # now a list: a line without its count can only be the single entry's
        default_steps = default_steps[0] if len(default_steps) == 1 else None
    curves, measured = {}, set()
    for number, line in enumerate(history.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            setting = SamplerSetting(record.get("num_inference_steps", default_steps), record.get("renoise"))
            point = {**record, "step": int(record["step"]), "fid": float(record["fid"])}
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{history}, line {number}: not an evaluation record ({error})") from None
        curves.setdefault(setting, {})[point["step"]] = point  # a resumed run evaluates again: the last one counts
        if "feature" in record:
            measured.add(f"{record['feature']} features, {record.get('num_samples')} samples")
    if not curves:
        raise ValueError(f"{history} is empty: the run ended before its first evaluation (--eval_steps "
                         f"{config.get('eval_steps')})")
    return RunRecord(str(folder), method, int(config["seed"]), shared_config(config), method_config(config),
                     {s: [points[step] for step in sorted(points)] for s, points in curves.items()},
                     "; ".join(sorted(measured)))


def shared_config(config: dict) -> dict:
    return {key: value for key, value in config.items() if key not in NOT_COMPARED}


def method_config(config: dict) -> dict:
    """What makes two runs of one method train alike beyond its name: for linear assignment, the group it
    assigns over (the trainers' own rule, `coupling_of_run`) and the precision of its cost."""
    if config["immiscible"] != "linear":
        return {}
    from ..renoise import coupling_of_run

    class_names = config.get("class_names") if config.get("class_conditional") else None
    coupling = coupling_of_run("linear", 1, config["train_batch_size"], config.get("assignment_scope", "auto"),
                               config.get("num_processes", 1), class_names)
    return {"assignment": coupling.describe(), "assignment_cost_dtype": config.get("assignment_cost_dtype")}


def read_benchmark_run(path: Path) -> RunRecord:
    """A convergence benchmark run file: {method, seed, curves {sampler steps: [evaluations]}, ...}. Its settings
    are those it records, else the settings key in its name (a hash of all of them)."""
    try:
        run = json.loads(path.read_text())
        method, seed, curves = run["method"], int(run["seed"]), run["curves"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ValueError(f"{path} is neither a trainer output folder nor a convergence benchmark run file (method, "
                         "seed, curves)") from None
    if not re.fullmatch(r"none|linear|knn\d+", method):
        raise ValueError(f"{path}: unknown method {method!r}")
    name = BENCHMARK_RUN.fullmatch(path.stem)
    settings = run.get("settings") or ({"benchmark settings": name["key"], "backend": "script" if name["script"] else
                                        "loop"} if name else {})
    return RunRecord(str(path), method, seed, dict(settings), {},
                     {SamplerSetting(int(n) if str(n).isdigit() else n): curve for n, curve in curves.items() if curve})


def check_comparable(runs: list[RunRecord]) -> None:
    """Refuses runs that differ in anything but method and seed (naming the keys and the runs), two runs of one
    method and seed, runs without a vanilla one, and methods without a seed in common with vanilla."""
    problems = differences(runs, lambda run: run.config)
    for method in sorted({run.method for run in runs}):
        problems += differences([run for run in runs if run.method == method], lambda run: run.method_config)
    if problems:
        raise ValueError("compare needs runs that differ only in their method (--immiscible, --immiscible_k) and "
                         "--seed; these runs differ in:\n" + "\n".join(problems))
    seen = {}
    for run in runs:
        if (run.method, run.seed) in seen:
            raise ValueError(f"two runs of {run.method} with seed {run.seed}: {seen[(run.method, run.seed)]} and "
                             f"{run.source}")
        seen[(run.method, run.seed)] = run.source
    vanilla = {run.seed for run in runs if run.method == "none"}
    if not vanilla:
        raise ValueError("no vanilla run (--immiscible none) among the runs: speed-ups are measured against vanilla "
                         "training with the same flags and seed; train one with --immiscible none")
    for method in sorted({run.method for run in runs} - {"none"}):
        seeds = sorted(run.seed for run in runs if run.method == method)
        if not vanilla & set(seeds):
            raise ValueError(f"{method} has seed(s) {', '.join(map(str, seeds))} and vanilla "
                             f"{', '.join(map(str, sorted(vanilla)))}: each run is compared with the vanilla run of "
                             "its seed (the same initial weights and data order); train vanilla with one of its seeds")


def differences(runs: list[RunRecord], settings_of) -> list[str]:
    """One line per key whose value is not the same in all `runs`: each value with the runs that have it."""
    missing = "<not recorded>"
    keys = sorted({key for run in runs for key in settings_of(run)})
    lines = []
    for key in keys:
        holders: dict[str, list[str]] = {}
        for run in runs:
            value = settings_of(run).get(key, missing)
            shown = value if value == missing else json.dumps(value, sort_keys=True)
            holders.setdefault(shown, []).append(run.source)
        if len(holders) > 1:
            lines.append(f"  {key}: " + "; ".join(f"{value} ({', '.join(names)})" for value, names in holders.items()))
    return lines
