#!/usr/bin/env python
"""Convergence benchmark: does immiscible training reach vanilla's FID in fewer steps, at which sampler step count?

Trains the same small UNet on the bundled MNIST with vanilla noise ("none"), linear assignment and KNN for a
list of k ("knn4", "knn8", ...), with identical seeds, data order and hyper-parameters, as a DDIM model
(`--family ddim`, the loop of train_immiscible_ddim.py) or a consistency model (`--family cm`, the loop of
train_immiscible_cm.py); evaluates FID (and KID) of the EMA weights at each of several sampler step counts on
a schedule that is denser early and holds every doubling of the steps; repeats over seeds; writes to
--output_dir (default docs/convergence/<family>, committed, so that later sessions reuse finished runs):

    results.md      per sampler step count: FID per step per method (mean ± std over seeds), steps each method
                    needs to reach vanilla's final FID and the speed-up with its spread, and whether vanilla
                    converged (FID improved < 10% over the last doubling of the steps); wall-clock per step
    fid_vs_steps.png  one panel per sampler step count
    results.json    every curve, timing and setting
    runs/*.json     one file per (method, k, seed, settings); a re-run with the same settings reuses them

    python benchmarks/convergence.py --family ddim          # the full DDIM benchmark (hours on a 2-core CPU)
    python benchmarks/convergence.py --family cm            # the full consistency-model benchmark
    python benchmarks/convergence.py --family cm --smoke    # a few steps, one seed, tiny model and evaluation

Settings (defaults). Both: MNIST 50k at 16 x 16, 1 channel; the trainer's MNIST UNet preset (channels 32-64-64,
one layer per block, attention at 8 x 8); batch 64; 100 warm-up steps then a constant learning rate (a decaying
schedule would make every method converge at the same place by construction); gradient clipping 1.0; EMA with
warm-up (inv_gamma 1, power 3/4, max decay 0.9999) evaluated; 4000 steps; FID against 10,000 training digits
with the 128-d features of a classifier trained on MNIST (its accuracy is reported); 3 seeds.
- ddim: AdamW 3e-4 (betas 0.95/0.999, weight decay 1e-6); 1000 DDPM steps, linear betas, epsilon prediction;
  FID of 1000 DDIM samples at 5, 10, 25 and 50 steps; KNN k = 8 (the papers' k for DDIM).
- cm: train_immiscible_cm.py's MNIST demo: AdamW 1e-3 (betas 0.9/0.999, no weight decay), dropout 0; improved
  consistency training (pseudo-Huber, log-normal levels, the same noise at both levels, stop-gradient target)
  with the curriculum 10 -> 1280 levels spread over the run's steps; FID of 2000 samples at 1 and 2 steps
  (`ConsistencyModelPipeline` with the recipe's stock scheduler); KNN k = 4 (the papers' k for CM).
  The curriculum depends on the run's total steps, so runs of another length train on another curriculum:
  their curves are not prefixes of each other.

How steps-to-target is read (per sampler step count): the target is vanilla's final FID of the same seed (same
initial weights and data order); a run reaches it at the first evaluation where FID <= target, linearly
interpolated from the previous evaluation. Speed-up = vanilla's steps / the method's steps, per seed; a run
that never reaches the target is reported as such and left out of the ratio. A second table gives every seed a
ratio: for a run that ends worse than vanilla, the steps vanilla needed to reach that run's final FID / the
run's steps (a slow-down below 1). Converged? compares vanilla's mean FID at the end with its mean FID at half
the steps: converged when it improved by less than 10% over that last doubling.

Two ways to train (--backend):
- "loop" (default): a short in-process copy of the trainer's loop (same data order, loss, EMA and optimiser,
  built on the library), timing every step and the noise call inside it; it keeps torch's per-tensor AdamW
  and EMAModel's per-tensor update (the same updates as the trainers' fused and foreach ones, a few ms slower
  per step) so that its runs stay comparable with those made before the trainers switched;
- "script": the real trainer (train_immiscible_ddim.py or train_immiscible_cm.py with --eval_steps) in a
  subprocess per run, its FID curve read from `eval_history.jsonl` and its timings from the tensorboard events
  it logs. The trainers evaluate every --eval_every steps only (no denser early points) with their own
  evaluation seed, and train_immiscible_ddim.py evaluates at one sampler step count per run.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.machine_info import cpu_model_and_flags  # noqa: E402
from immiscible_pipeline import ImmiscibleNoise  # noqa: E402
from immiscible_pipeline.evaluation.classifier import ClassifierTraining  # noqa: E402
from immiscible_pipeline.evaluation.fid_curves import (change, curve_view, describe_convergence,  # noqa: E402
                                                     equal_fid_cells, EQUAL_FID_HEADER, mean_std, plot_fid_curves,
                                                     summarise_by_sampler)
from immiscible_pipeline.evaluation.pipeline_metrics import TrainingEvaluator  # noqa: E402
from immiscible_pipeline.training.accelerator_setup import noise_stream_seed  # noqa: E402
from immiscible_pipeline.training.consistency_training import ConsistencyRecipe  # noqa: E402
from immiscible_pipeline.data import ImageTransform, load_mnist, sample_seed, TrainImages  # noqa: E402
from immiscible_pipeline.training.pixel_objectives import (ConsistencyObjective, DiffusionObjective,  # noqa: E402
                                                          FlowObjective)
from immiscible_pipeline.training.sample_grids import averaged_weights  # noqa: E402
from immiscible_pipeline.training.unet_presets import MNIST_UNET  # noqa: E402

FAMILIES = ("ddim", "cm", "flow")
METHODS = ("none", "linear", "knn")
CONVERGED_BELOW = 0.10  # converged: vanilla's FID improved by less than this fraction over the last doubling
SMOKE_UNET = {"sample_size": 16, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
              "block_out_channels": (8, 16), "down_block_types": ("DownBlock2D", "DownBlock2D"),
              "up_block_types": ("UpBlock2D", "UpBlock2D"), "norm_num_groups": 4}
# What differs between the families by default (the rest of Settings is shared).
FAMILY_DEFAULTS = {
    "ddim": {"learning_rate": 3e-4, "adam_beta1": 0.95, "weight_decay": 1e-6, "eval_every": 1000,
             "eval_samples": 1000, "eval_inference_steps": [5, 10, 25, 50], "knn_k": [8]},
    "cm": {"learning_rate": 1e-3, "adam_beta1": 0.9, "weight_decay": 0.0, "eval_every": 500,
           "eval_samples": 2000, "eval_inference_steps": [1, 2], "knn_k": [4]},
    "flow": {"learning_rate": 3e-4, "adam_beta1": 0.95, "weight_decay": 1e-6, "eval_every": 1000,
             "eval_samples": 1000, "eval_inference_steps": [1, 2, 4, 8, 16], "knn_k": [4]},
}
# The flow family's objective: train_immiscible_flow.py's defaults (diffusers' SD3 example's timestep density).
FLOW_SETTINGS = {"weighting_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29}
TRAINERS = {"ddim": "train_immiscible_ddim.py", "cm": "train_immiscible_cm.py", "flow": "train_immiscible_flow.py"}


@dataclass
class Settings:
    family: str = "ddim"
    steps: int = 4000
    eval_every: int = 1000
    batch_size: int = 64
    learning_rate: float = 3e-4
    adam_beta1: float = 0.95
    weight_decay: float = 1e-6
    warmup_steps: int = 100
    eval_samples: int = 1000
    eval_inference_steps: list = field(default_factory=lambda: [5, 10, 25, 50])
    num_reference: int = 10_000
    train_images: int | None = None  # None: all 50,000
    unet: dict = field(default_factory=lambda: dict(MNIST_UNET))
    classifier: dict = field(default_factory=lambda: asdict(ClassifierTraining()))
    recipe: dict | None = None  # cm: the ConsistencyRecipe's fields
    flow: dict | None = None  # flow: the FlowObjective's arguments
    train_eval: bool = True  # False: no FID during training, only the weights kept for --reevaluate
    # disjoint: the trainers' seeds (weights from seed s, noise from noise_stream_seed(s, 0)) and their fused AdamW
    # and foreach EMA; overlapping: runs made before (noise from seed s + 1, the next seed's weights; per-tensor)
    seed_streams: str = "disjoint"

    def eval_steps(self) -> list[int]:
        """Every `eval_every` steps, plus every halving of the run down to 1/16 of it (250, 500, 1000, 2000,
        4000 for 4000 steps): dense early, and the half-way point the converged? check compares with."""
        regular = set(range(self.eval_every, self.steps + 1, self.eval_every))
        halvings, step = set(), self.steps
        while step >= max(2, self.steps / 16):
            halvings.add(step)
            step //= 2
        return sorted(regular | halvings | {self.steps})

    def key(self) -> str:
        fields = asdict(self)
        # Fields added later drop out at the values runs made before them had, so those runs keep their names.
        if fields["train_eval"]:
            del fields["train_eval"]
        if fields["flow"] is None:
            del fields["flow"]
        if fields["seed_streams"] == "overlapping":
            del fields["seed_streams"]
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]


def method_names(methods: list[str], knn_k: list[int]) -> list[str]:
    """Run names: "none", "linear", and "knn<k>" for each k of a plain "knn" (an explicit "knn4" is kept)."""
    names = []
    for method in methods:
        for name in ([f"knn{k}" for k in knn_k] if method == "knn" else [method]):
            if name not in names:
                names.append(name)
    return names


def parse_method(name: str) -> tuple[str, int]:
    """("knn", 4) for "knn4"; (method, 1) for "none" and "linear"."""
    match = re.fullmatch(r"knn(\d+)", name)
    if match:
        return "knn", int(match.group(1))
    if name not in ("none", "linear"):
        raise ValueError(f"unknown method {name!r}: use none, linear, knn (with --knn_k) or knn<k> such as knn4")
    return name, 1


def mnist_tensor(settings: Settings) -> torch.Tensor:
    """The training images as the trainers' data pipeline makes them ([-1, 1], centre crop, no flip). The
    transform is deterministic, so it is applied once here instead of per batch."""
    dataset = load_mnist("train")
    if settings.train_images is not None:
        dataset = dataset.select(range(settings.train_images))
    images = TrainImages(dataset, "image", ImageTransform(settings.unet["sample_size"], 1, center_crop=True))
    return torch.stack([item["pixel_values"] for item in images.__getitems__(list(range(len(images))))])


def batches(images: torch.Tensor, batch_size: int, seed: int):
    """Endless epochs; each epoch's order fixed by (seed, epoch) as in data.EpochShuffle (a short last batch)."""
    epoch = 0
    while True:
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(sample_seed(seed, epoch)))
        for start in range(0, len(images), batch_size):
            yield images[order[start:start + batch_size]]
        epoch += 1


# --- the families' losses and samplers: the trainers' own objects ------------------------------------------------

def make_objective(settings: Settings):
    """The trainer's objective for `settings.family`: DDIM on 1000 linear-beta DDPM steps with epsilon prediction
    (train_immiscible_ddim.py with a dataset), consistency training with the settings' recipe
    (train_immiscible_cm.py), rectified flow with the settings' timestep density (train_immiscible_flow.py)."""
    if settings.family == "ddim":
        return DiffusionObjective(1000, "linear", "epsilon")
    if settings.family == "cm":
        return ConsistencyObjective(ConsistencyRecipe(**settings.recipe))
    return FlowObjective(**settings.flow)


def train_run(name: str, seed: int, settings: Settings, images: torch.Tensor, evaluator: TrainingEvaluator,
              log=print, weights_dir: str | None = None) -> dict:
    """One training run in this process; returns its FID curve per sampler step count and per-step timings.
    With `weights_dir`, the EMA weights evaluated at each evaluation step are kept there (`save_weights`), so
    that `--reevaluate` can score them with other samplers without training again."""
    from diffusers import UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    method, k = parse_method(name)
    torch.manual_seed(seed)  # the same initial weights for every method
    model = UNet2DModel.from_config(settings.unet)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                   foreach=settings.seed_streams == "disjoint", model_cls=UNet2DModel, model_config=model.config)
    objective = make_objective(settings)
    # The trainers' fused AdamW; runs with overlapping seed streams (made before) used the per-tensor one.
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, betas=(settings.adam_beta1, 0.999),
                                  weight_decay=settings.weight_decay, eps=1e-8,
                                  fused=settings.seed_streams == "disjoint")
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer=optimizer, num_warmup_steps=settings.warmup_steps,
                                 num_training_steps=settings.steps)
    immiscible = ImmiscibleNoise(method=method, k=k)
    # Noise and levels: the same stream for every method (KNN draws more of it), the trainers' stream for this
    # seed; "overlapping" (runs made before) used seed + 1, the next seed's initial weights.
    torch.manual_seed(noise_stream_seed(seed, 0) if settings.seed_streams == "disjoint" else seed + 1)
    eval_at = set(settings.eval_steps())
    report_every = max(1, settings.steps // 10)
    curves = {str(n): [] for n in settings.eval_inference_steps}
    step_ms, noise_ms, losses = [], [], []
    data = batches(images, settings.batch_size, seed)
    model.train()
    started, cpu_started = time.perf_counter(), time.process_time()  # CPU time leaves out pauses (SIGSTOP)
    for step in range(1, settings.steps + 1):
        clean = next(data)
        t0 = time.perf_counter()
        noise = immiscible(clean)  # Immiscible Diffusion: the noise assigned to this batch
        t1 = time.perf_counter()
        loss = objective.loss(model, clean, noise, step - 1, settings.steps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())
        t2 = time.perf_counter()
        step_ms.append(1000 * (t2 - t0))
        noise_ms.append(1000 * (t1 - t0))
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{name} seed {seed}: the loss is {losses[-1]} at step {step}")
        if step % report_every == 0 and step not in eval_at:
            median = statistics.median(step_ms[-report_every:])
            log(f"  {name:6s} seed {seed} step {step:5d}/{settings.steps}: loss {np.mean(losses[-50:]):.4f}, "
                f"{median:.0f} ms/step, about {median * (settings.steps - step) / 60000:.0f} min of training left")
        if step in eval_at and not settings.train_eval:
            with averaged_weights(model.parameters(), ema):
                save_weights(model, weights_dir, step)
            log(f"  {name:6s} seed {seed} step {step:5d}/{settings.steps}: weights kept; loss "
                f"{np.mean(losses[-50:]):.4f} (run {time.perf_counter() - started:.0f} s)")
        elif step in eval_at:
            pipeline = objective.pipeline(model)
            eval_start = time.perf_counter()
            with averaged_weights(model.parameters(), ema):
                for n in settings.eval_inference_steps:
                    metrics = evaluator(pipeline, num_inference_steps=n)
                    curves[str(n)].append({"step": step, **metrics, "loss": float(np.mean(losses[-50:]))})
                if weights_dir is not None:
                    save_weights(model, weights_dir, step)
            model.train()
            fids = ", ".join(f"{n} step{'s' if n > 1 else ''} {curves[str(n)][-1]['fid']:.3f}"
                             for n in settings.eval_inference_steps)
            log(f"  {name:6s} seed {seed} step {step:5d}/{settings.steps}: FID {fids}; loss {np.mean(losses[-50:]):.4f}"
                f" (evaluation {time.perf_counter() - eval_start:.0f} s, run {time.perf_counter() - started:.0f} s)")
    return {"method": name, "seed": seed, "curves": curves, "step_ms_median": statistics.median(step_ms),
            "noise_ms_median": statistics.median(noise_ms), "train_seconds": sum(step_ms) / 1000,
            "wall_seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started,
            "machine": machine()}


def weights_path(weights_dir: str, step: int) -> str:
    return os.path.join(weights_dir, f"step-{step:06d}.safetensors")


def has_weights(weights_dir: str, settings: Settings) -> bool:
    """Whether a run's weights are kept at every evaluation step."""
    return all(os.path.isfile(weights_path(weights_dir, step)) for step in settings.eval_steps())


def save_weights(model, weights_dir: str, step: int) -> None:
    """The model's current weights (the EMA weights, inside `averaged_weights`) at `step`, written atomically."""
    from safetensors.torch import save_file

    os.makedirs(weights_dir, exist_ok=True)
    path = weights_path(weights_dir, step)
    save_file({name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()},
              path + ".partial")
    os.replace(path + ".partial", path)


# --- the real trainers (--backend script) -----------------------------------------------------------------------

def script_command(name: str, seed: int, settings: Settings, run_dir: str, unet_config: str,
                   evaluate: bool = True) -> list[str]:
    """The trainer's command line for this run (the same settings as the loop, as the trainer's flags); without
    `evaluate`, no FID during training."""
    method, k = parse_method(name)
    never = str(10 * settings.steps)
    command = [sys.executable, os.path.join(REPO, TRAINERS[settings.family]), "--output_dir", run_dir,
               "--seed", str(seed), "--immiscible", method, "--immiscible_k", str(k),
               "--model_config_name_or_path", unet_config, "--train_batch_size", str(settings.batch_size),
               "--max_train_steps", str(settings.steps), "--learning_rate", str(settings.learning_rate),
               "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", str(settings.warmup_steps),
               "--adam_beta1", str(settings.adam_beta1), "--adam_weight_decay", str(settings.weight_decay),
               "--use_ema", "--checkpointing_steps", never, "--validation_steps", never, "--report_to", "tensorboard"]
    if evaluate:
        command += ["--eval_steps", str(settings.eval_every), "--eval_feature", "classifier",
                    "--eval_num_samples", str(settings.eval_samples), "--eval_num_reference",
                    str(settings.num_reference), "--eval_inference_steps", *map(str, settings.eval_inference_steps)]
    if settings.family == "ddim":  # the loop's objective, not the MNIST demo's
        command += ["--prediction_type", "epsilon", "--ddpm_beta_schedule", "linear", "--snr_gamma", "0"]
    if settings.family == "flow":
        command += [item for name, value in settings.flow.items() for item in (f"--{name}", str(value))]
    if settings.family == "cm":
        recipe = settings.recipe
        command += ["--dropout", str(settings.unet.get("dropout", 0.0)), "--loss", recipe["loss"],
                    "--curriculum_start", str(recipe["curriculum_start"]),
                    "--curriculum_end", str(recipe["curriculum_end"]), "--p_mean", str(recipe["p_mean"]),
                    "--p_std", str(recipe["p_std"]), "--sigma_min", str(recipe["sigma_min"]),
                    "--sigma_max", str(recipe["sigma_max"]), "--sigma_data", str(recipe["sigma_data"]),
                    "--rho", str(recipe["rho"])]
        if recipe["huber_c"] is not None:
            command += ["--huber_c", str(recipe["huber_c"])]
    return command


def train_run_script(name: str, seed: int, settings: Settings, run_dir: str, cache_dir: str | None,
                     log=print) -> dict:
    """The same run through the real trainer (a subprocess); returns what `train_run` returns."""
    if settings.train_images is not None:
        raise ValueError("--backend script trains on the whole bundled MNIST (no --train_images subset)")
    os.makedirs(run_dir, exist_ok=True)
    unet_config = os.path.join(run_dir, "unet_config.json")
    with open(unet_config, "w") as handle:
        json.dump({"_class_name": "UNet2DModel", **settings.unet}, handle)
    history = os.path.join(run_dir, "eval_history.jsonl")
    if os.path.exists(history):
        os.remove(history)  # a half-finished earlier attempt
    command = script_command(name, seed, settings, run_dir, unet_config)
    env = dict(os.environ, **({"IMMISCIBLE_CACHE": cache_dir} if cache_dir else {}))
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, cwd=REPO)
    curves = read_history(history, settings.eval_inference_steps[0])
    for n, curve in curves.items():
        for point in curve:
            log(f"  {name:6s} seed {seed} step {point['step']:5d}, {n} sampler steps: FID {point['fid']:.3f}")
    step_ms, assign_ms = tensorboard_timings(run_dir)
    return {"method": name, "seed": seed, "curves": curves, "step_ms_median": step_ms, "noise_ms_median": assign_ms,
            "timing_source": "tensorboard: wall time between logged steps; immiscible/time_ms (assignment only)",
            "wall_seconds": time.perf_counter() - started, "machine": machine()}


def read_history(path: str, default_steps: int) -> dict:
    """eval_history.jsonl as {sampler steps: curve}; a line without num_inference_steps (the DDIM trainer)
    belongs to `default_steps`."""
    curves: dict[str, list] = {}
    with open(path) as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                n = str(record.get("num_inference_steps", default_steps))
                curves.setdefault(n, []).append({key: record[key] for key in ("step", "fid", "kid_mean", "kid_std")})
    return curves


def tensorboard_timings(run_dir: str) -> tuple[float, float]:
    """Median wall-clock between consecutive logged steps, and the median logged assignment time (ms)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(glob.glob(os.path.join(run_dir, "**", "events.out.tfevents.*"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no tensorboard events under {run_dir}")
    events = EventAccumulator(os.path.dirname(files[-1]), size_guidance={"scalars": 0})
    events.Reload()
    walls = [e.wall_time for e in sorted(events.Scalars("loss"), key=lambda e: e.step)]
    step_ms = statistics.median(1000 * (b - a) for a, b in zip(walls, walls[1:]))
    assign_ms = statistics.median(e.value for e in events.Scalars("immiscible/time_ms"))
    return step_ms, assign_ms


# --- reading the curves ----------------------------------------------------------------------------------
# first_reach, summarise, mean_interval, verdict, convergence_check, ...: immiscible_pipeline.evaluation.fid_curves,
# the same code as `python -m immiscible_pipeline.compare` (imported above).


# --- writing it up --------------------------------------------------------------------------------------------

def machine() -> str:
    """CPU model and torch threads, named next to every timing."""
    model, count, _ = cpu_model_and_flags()
    if count:
        model = f"{model} ({count} logical CPUs)"
    return f"{model}, {torch.get_num_threads()} torch threads"


def sampler_name(family: str, n: int) -> str:
    return {"ddim": f"DDIM-{n}", "cm": f"{n}-step consistency sampling", "flow": f"Euler-{n}"}[family]


def markdown(summaries: dict, runs: list[dict], methods: list[str], seeds: list[int], settings: Settings,
             classifier_accuracy: float | None, wall_minutes: float, backend: str = "loop") -> str:
    accuracy = "" if classifier_accuracy is None else f", classifier test accuracy {classifier_accuracy:.4f}"
    title = {"ddim": "DDIM", "cm": "consistency model", "flow": "rectified flow, Euler sampling"}[settings.family]
    lines = [f"# Convergence benchmark: {settings.family} ({title})",
             "", f"FID of the EMA weights (classifier features{accuracy}; {settings.eval_samples} samples vs "
             f"{settings.num_reference} training digits), mean ± std over {len(seeds)} seed(s) {seeds}, at each "
             f"sampler step count {settings.eval_inference_steps}.", ""]
    converged = [f"- {sampler_name(settings.family, n)}: {describe_convergence(s['converged'])}"
                 for n, s in summaries.items() if "converged" in s]
    if converged:
        lines += ["Did vanilla converge (FID improved by less than 10% over the last doubling of the steps)?", "",
                  *converged, ""]
    for n, summary in summaries.items():
        by = {(r["method"], r["seed"]): r for r in curve_view(runs, n)}
        lines += [f"## {sampler_name(settings.family, n)}", "", "| step | " + " | ".join(methods) + " |",
                  "|---|" + "---|" * len(methods)]
        for i, step in enumerate(summary["steps"]):
            lines.append(f"| {step} | " + " | ".join(mean_std([summary['fid'][m][s][i] for s in seeds])
                                                    for m in methods) + " |")
        final_kid = {m: [by[(m, s)]["curve"][-1]["kid_mean"] for s in seeds] for m in methods}
        lines.append("| KID (final) | " + " | ".join(mean_std(final_kid[m]) for m in methods) + " |")
        if summary["reach"]:
            lines += ["", "Steps to reach vanilla's final FID (per seed: that seed's vanilla run), and the speed-up "
                          "vanilla steps / method steps:", "",
                      "| method | steps per seed | speed-up (mean ± std) | seeds not reaching it |",
                      "|---|---|---|---|"]
            for m in methods:
                per_seed = ", ".join("never" if summary["reach"][m][s] is None else f"{summary['reach'][m][s]:.0f}"
                                     for s in seeds)
                lines.append(f"| {m} | {per_seed} | {mean_std(summary['ratio'][m])} | "
                             f"{len(summary['unreached'][m])} / {len(seeds)} |")
            lines += ["", "Speed-up at equal FID for every seed, slow-downs included: where the method reaches "
                          "vanilla's final FID, as above; where it does not, the steps vanilla needed to reach the "
                          "method's final FID / the method's steps. The interval is Student's t 95% interval of "
                          "the mean over seeds; the verdict names a gain or a loss only where it excludes 1.0:", "",
                      "| method | " + " | ".join(EQUAL_FID_HEADER) + " |", "|---|---|---|---|---|"]
            lines += [f"| {m} | " + " | ".join(equal_fid_cells(summary, m)) + " |" for m in methods]
        if "converged" in summary:
            per_seed = ", ".join("-" if c["improvement"] is None else change(c["improvement"])
                                 for c in summary["converged_per_seed"].values())
            lines += ["", describe_convergence(summary["converged"]) + f" (per seed: {per_seed})."]
        lines.append("")
    timing = next(iter(summaries.values()))["timing"]
    base = timing.get("none", {}).get("step_ms")
    timed = "noise call" if backend == "loop" else "assignment"
    source = ("in-process loop, runs interleaved by seed" if backend == "loop" else
              f"{TRAINERS[settings.family]}, from its tensorboard events; the assignment excludes drawing the noise")
    machines = "; ".join(sorted({run.get("machine", "machine not recorded") for run in runs}))
    lines += [f"Wall-clock per training step (medians over steps, then over seeds; {source}; {machines}):", "",
              f"| method | step (ms) | {timed} (ms) | {timed} share of the step | step vs none |",
              "|---|---|---|---|---|"]
    for m in methods:
        t = timing[m]
        versus = f"{t['step_ms'] / base:.3f}x" if base else "-"
        lines.append(f"| {m} | {t['step_ms']:.1f} | {t['noise_ms']:.2f} | {100 * t['noise_ms'] / t['step_ms']:.2f}% "
                     f"| {versus} |")
    unet = settings.unet
    lines += ["", f"Setting: MNIST {settings.train_images or 50000} images at {unet['sample_size']} px; UNet "
                  f"{tuple(unet['block_out_channels'])}, {unet['layers_per_block']} layer(s) per block"
                  f"{', dropout ' + str(unet.get('dropout', 0.0)) if settings.family == 'cm' else ''}; batch "
                  f"{settings.batch_size}; AdamW {settings.learning_rate:g} (beta1 {settings.adam_beta1:g}, "
                  "weight decay "
                  f"{settings.weight_decay:g}), {settings.warmup_steps} warm-up steps then constant; EMA with "
                  f"warm-up; {settings.steps} steps, FID at steps "
                  f"{settings.eval_steps() if backend == 'loop' else 'every ' + str(settings.eval_every)}."]
    if settings.family == "cm":
        recipe = ConsistencyRecipe(**settings.recipe)
        doublings = math.floor(math.log2(recipe.curriculum_end / recipe.curriculum_start)) + 1
        lines += ["", f"Consistency training: {recipe.loss} loss, curriculum {recipe.curriculum_start} -> "
                      f"{recipe.curriculum_end} levels over the run's {settings.steps} steps (doubling every "
                      f"{max(1, settings.steps // doublings)}"
                      f" steps), log-normal levels ({recipe.p_mean:g}, {recipe.p_std:g}), sigma in "
                      f"[{recipe.sigma_min:g}, {recipe.sigma_max:g}]. The curriculum depends on the total steps: a "
                      "run with another horizon trains on another curriculum, so these curves are not the first part "
                      "of a longer run's, and a longer run's FID at the same step can differ."]
    if settings.family == "flow":
        flow = settings.flow
        lines += ["", f"Rectified flow: x_t = (1 - s) x0 + s z, velocity target z - x0, levels s by the "
                      f"{flow['weighting_scheme']} density (mean {flow['logit_mean']:g}, std {flow['logit_std']:g}), "
                      "FlowMatchEulerDiscreteScheduler (Euler from s = 1 to 0) in a stock DDPMPipeline."]
    lines += ["", f"Seed streams: {settings.seed_streams}.", "",
              f"Trainer: {backend}. Wall-clock of the runs (training and evaluation, summed): "
                  f"{sum(r['wall_seconds'] for r in runs) / 60:.1f} min (pauses included); of this invocation: "
                  f"{wall_minutes:.1f} min."]
    timed = [r["cpu_seconds"] for r in runs if "cpu_seconds" in r]
    if timed:
        lines[-1] += (f" CPU time of the {len(timed)} run(s) that record it (all threads, pauses left out): "
                      f"{sum(timed) / 3600:.2f} h.")
    return "\n".join(lines) + "\n"


def plot(summaries: dict, methods: list[str], seeds: list[int], family: str, path: str) -> None:
    plot_fid_curves({sampler_name(family, n): summary for n, summary in summaries.items()}, methods, path,
                    "FID (classifier features)", f"{family}: FID vs steps, mean ± std over seeds")


# --- command line ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=FAMILIES, default="ddim",
                        help="ddim: train_immiscible_ddim.py's loss and DDIM sampling; cm: train_immiscible_cm.py's "
                             "consistency training and 1- / 2-step sampling")
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        help="none, linear, knn (one run per --knn_k) or knn<k> such as knn4")
    parser.add_argument("--knn_k", type=int, nargs="+", default=None, help="k of knn (default: 8 for ddim, 4 for cm)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 4000)")
    parser.add_argument("--eval_every", type=int, default=None,
                        help="evaluate every N steps, besides every halving of the run down to 1/16 of it "
                             "(default: 1000 for ddim, 500 for cm)")
    parser.add_argument("--eval_samples", type=int, default=None,
                        help="samples per evaluation (default: 1000 for ddim, 2000 for cm)")
    parser.add_argument("--eval_inference_steps", type=int, nargs="+", default=None,
                        help="sampler step counts, one FID each per evaluation (default: 5 10 25 50 for ddim, 1 2 "
                             "for cm, 1 2 4 8 16 for flow)")
    parser.add_argument("--batch_size", type=int, default=None, help="default 64")
    parser.add_argument("--learning_rate", type=float, default=None, help="default: 3e-4 for ddim, 1e-3 for cm")
    parser.add_argument("--output_dir", default=None, help="default docs/convergence/<family> (kept in git)")
    parser.add_argument("--work_dir", default=None,
                        help="not kept in git: each run's weights at its evaluation steps (--backend loop) or the "
                             "trainers' output folders (--backend script); default "
                             "benchmark-results/convergence-work/<family>")
    parser.add_argument("--cache_dir", default=None,
                        help="classifier / reference-feature cache (default: the package's, $IMMISCIBLE_CACHE or "
                             "~/.cache/immiscible_pipeline)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--backend", choices=("loop", "script"), default="loop",
                        help="loop: the in-process copy of the trainer's loop (times every step); script: the real "
                             "trainer with --eval_steps, one subprocess per run")
    parser.add_argument("--retrain_missing_weights", action="store_true",
                        help="train again the finished runs whose weights are not kept in --work_dir (runs made "
                             "before the benchmark kept weights), so that --reevaluate can score them")
    parser.add_argument("--no_train_eval", action="store_true",
                        help="no FID during training: only keep the weights at the evaluation steps, for --reevaluate "
                             "(these runs are named apart from the ones evaluated during training)")
    parser.add_argument("--reevaluate", nargs="+", default=None, metavar="SAMPLER",
                        help="score the runs' kept weights again with these samplers, e.g. cm-1 cm-2 cm-2-matched or "
                             "ddim-10 ddim-10-eta1-matched ddpm-50-matched (see benchmarks/sampler_study.py); writes "
                             "<output_dir>/samplers/")
    parser.add_argument("--reeval_steps", type=int, nargs="+", default=None,
                        help="--reevaluate at these training steps only (default: every evaluation step)")
    parser.add_argument("--reeval_samples", type=int, default=None,
                        help="samples per --reevaluate score (default: the family's --eval_samples)")
    parser.add_argument("--seed_streams", choices=("disjoint", "overlapping"), default="disjoint",
                        help="disjoint (default): the trainers' seeds, fused AdamW and foreach EMA; overlapping: "
                             "as the runs made before (noise stream of seed s = initial weights of seed s + 1), to "
                             "reuse or reproduce them")
    parser.add_argument("--smoke", action="store_true", help="a few steps, one seed, tiny model and evaluation")
    args = parser.parse_args(argv)
    try:
        for name in method_names(args.methods, args.knn_k or [1]):
            parse_method(name)
    except ValueError as error:
        parser.error(str(error))
    for flag in ("steps", "eval_every", "eval_samples", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < (2 if flag == "eval_samples" else 1):
            parser.error(f"--{flag} must be at least {2 if flag == 'eval_samples' else 1}, got {value}")
    if min(args.eval_inference_steps or [1]) < 1 or min(args.knn_k or [1]) < 1:
        parser.error("--eval_inference_steps and --knn_k must be at least 1")
    return args


def build_settings(args) -> Settings:
    family = FAMILY_DEFAULTS[args.family]
    common = {key: value for key, value in family.items() if key != "knn_k"}
    if args.smoke:
        settings = Settings(family=args.family, **common)
        settings.steps, settings.eval_every, settings.batch_size, settings.warmup_steps = 6, 3, 16, 2
        settings.eval_samples, settings.eval_inference_steps, settings.num_reference = 24, [1, 2], 200
        settings.train_images, settings.unet = 512, dict(SMOKE_UNET)
        settings.classifier = asdict(ClassifierTraining(steps=20, max_train_images=2000, max_test_images=500))
    else:
        settings = Settings(family=args.family, **common)
    for name in ("steps", "eval_every", "eval_samples", "eval_inference_steps", "batch_size", "learning_rate"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    if args.family == "flow":
        settings.flow = dict(FLOW_SETTINGS)
    if args.family == "cm":
        settings.recipe = asdict(ConsistencyRecipe())
        settings.unet = {**settings.unet, "dropout": 0.0}  # the trainer's MNIST demo trains without dropout
    settings.train_eval = not args.no_train_eval
    settings.seed_streams = args.seed_streams
    return settings


def default_output_dir(family: str) -> str:
    """docs/convergence/<family>: results and finished runs are committed, so later sessions reuse the runs."""
    return os.path.join(REPO, "docs", "convergence", family)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.smoke and args.seeds == [0, 1, 2]:
        args.seeds = [0]
    threads = torch.get_num_threads()
    # The smoke model's ops are too small to share between threads; on a busy machine two threads waiting on
    # each other made its steps 20x slower.
    torch.set_num_threads(args.threads or (1 if args.smoke else threads))
    try:
        return run_benchmark(args)
    finally:
        torch.set_num_threads(threads)


def run_benchmark(args) -> dict:
    settings = build_settings(args)
    methods = method_names(args.methods, args.knn_k or FAMILY_DEFAULTS[args.family]["knn_k"])
    output_dir = args.output_dir or default_output_dir(args.family)
    work_dir = args.work_dir or os.path.join(REPO, "benchmark-results", "convergence-work", args.family)
    # Runs trained without FID (kept only for --reevaluate) are filed with the sampler study, so that `runs/` holds
    # one setting's evaluated runs, as `python -m immiscible_pipeline.compare <output_dir>/runs` needs.
    runs_dir = os.path.join(output_dir, "runs") if settings.train_eval else os.path.join(output_dir, "samplers", "runs")
    os.makedirs(runs_dir, exist_ok=True)
    started = time.perf_counter()
    print(f"convergence benchmark ({args.family}): methods {methods}, seeds {args.seeds}, {settings.steps} steps, FID "
          f"at {settings.eval_steps() if args.backend == 'loop' else 'every ' + str(settings.eval_every)} on "
          f"{settings.eval_samples} samples with {settings.eval_inference_steps} sampler steps; output {output_dir}; "
          f"{machine()}", flush=True)
    images = mnist_tensor(settings) if args.backend == "loop" else None
    evaluator = TrainingEvaluator(reference="mnist", num_samples=settings.eval_samples, feature="classifier",
                                  num_inference_steps=settings.eval_inference_steps[0], batch_size=250, seed=1234,
                                  cache_dir=args.cache_dir, num_reference=settings.num_reference,
                                  classifier_settings=ClassifierTraining(**settings.classifier), progress=False)
    prepare_start = time.perf_counter()
    evaluator.prepare(settings.unet["sample_size"], settings.unet["in_channels"])  # classifier + reference features
    accuracy = evaluator.classifier_test_accuracy
    print(f"evaluation ready in {time.perf_counter() - prepare_start:.0f} s: classifier test accuracy {accuracy:.4f}",
          flush=True)
    runs, total = [], len(args.seeds) * len(methods)
    for seed in args.seeds:  # seeds outer, methods inner: slow drifts of the shared CPU hit every method alike
        for name in methods:
            run_name = f"{name}-seed{seed}-{settings.key()}{'-script' if args.backend == 'script' else ''}"
            path = os.path.join(runs_dir, f"{run_name}.json")
            weights_dir = os.path.join(work_dir, run_name, "weights")
            if os.path.isfile(path) and not (args.retrain_missing_weights and args.backend == "loop"
                                             and not has_weights(weights_dir, settings)):
                with open(path) as handle:
                    runs.append(json.load(handle))
                print(f"[{len(runs)}/{total}] {name} seed {seed}: reusing {os.path.relpath(path)}", flush=True)
                continue
            print(f"[{len(runs) + 1}/{total}] {name} seed {seed}: training", flush=True)
            if args.backend == "script":
                run = train_run_script(name, seed, settings, os.path.join(work_dir, run_name), args.cache_dir)
            else:
                run = train_run(name, seed, settings, images, evaluator, log=lambda text: print(text, flush=True),
                                weights_dir=weights_dir)
            with open(path + ".partial", "w") as handle:
                json.dump(run, handle)
            os.replace(path + ".partial", path)  # a run cut off half-way leaves no file that looks finished
            runs.append(run)
    if args.reevaluate:
        return reevaluate(args, settings, methods, runs, evaluator, output_dir, work_dir)
    if not settings.train_eval:
        print(f"trained without evaluation: the weights are in {work_dir}; score them with --reevaluate")
        return {"runs": runs}
    summaries = summarise_by_sampler(runs, methods, args.seeds, settings.eval_inference_steps)
    wall_minutes = (time.perf_counter() - started) / 60
    table = markdown(summaries, runs, methods, args.seeds, settings, accuracy, wall_minutes, args.backend)
    with open(os.path.join(output_dir, "results.md"), "w") as handle:
        handle.write(table)
    plot(summaries, methods, args.seeds, args.family, os.path.join(output_dir, "fid_vs_steps.png"))
    result = {"settings": asdict(settings), "family": args.family, "backend": args.backend, "methods": methods,
              "seeds": args.seeds, "runs": runs, "classifier_test_accuracy": accuracy, "machine": machine(),
              "summary": {str(n): {k: v for k, v in s.items() if k != "fid"} for n, s in summaries.items()},
              "wall_minutes": wall_minutes, "torch_threads": torch.get_num_threads()}
    with open(os.path.join(output_dir, "results.json"), "w") as handle:
        json.dump(result, handle, indent=1, default=str)
    print(table)
    return result


def reevaluate(args, settings: Settings, methods: list[str], runs: list[dict], evaluator, output_dir: str,
               work_dir: str) -> dict:
    """--reevaluate: every run's kept weights scored with each sampler; tables, plot, JSON in <output_dir>/samplers."""
    from benchmarks import sampler_study

    started = time.perf_counter()
    samplers = [sampler_study.parse_sampler(name, settings.family) for name in args.reevaluate]
    steps = args.reeval_steps or settings.eval_steps()
    if args.reeval_samples:
        evaluator.num_samples = args.reeval_samples
    study_dir = os.path.join(output_dir, "samplers")
    os.makedirs(os.path.join(study_dir, "scores"), exist_ok=True)
    objective = make_objective(settings)
    for run in runs:
        run_name = f"{run['method']}-seed{run['seed']}-{settings.key()}"
        method, k = parse_method(run["method"])
        scores = os.path.join(study_dir, "scores", f"{run_name}-{evaluator.num_samples}samples.json")
        run["curves"] = sampler_study.score_run(run_name, method, k, os.path.join(work_dir, run_name, "weights"),
                                                steps, samplers, settings, objective, evaluator, scores,
                                                log=lambda text: print(text, flush=True))
    summaries = summarise_by_sampler(runs, methods, args.seeds, [s.name for s in samplers])
    table = sampler_study.markdown(summaries, samplers, methods, args.seeds, settings, steps, evaluator.num_samples,
                                   evaluator.classifier_test_accuracy, machine(),
                                   (time.perf_counter() - started) / 60, mean_std)
    with open(os.path.join(study_dir, "results.md"), "w") as handle:
        handle.write(table)
    sampler_study.plot(summaries, samplers, methods, args.seeds, os.path.join(study_dir, "fid_vs_steps.png"))
    result = {"settings": asdict(settings), "samplers": args.reevaluate, "steps": steps, "methods": methods,
              "seeds": args.seeds, "num_samples": evaluator.num_samples, "machine": machine(),
              "curves": {f"{r['method']}-seed{r['seed']}": r["curves"] for r in runs},
              "summary": {n: {k: v for k, v in s.items() if k != "fid"} for n, s in summaries.items()}}
    with open(os.path.join(study_dir, "results.json"), "w") as handle:
        json.dump(result, handle, indent=1, default=str)
    print(table)
    return result


if __name__ == "__main__":
    main()
