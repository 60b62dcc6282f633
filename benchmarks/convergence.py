#!/usr/bin/env python
"""Convergence benchmark: does immiscible training reach vanilla's FID in fewer steps?

Trains the same small UNet on the bundled MNIST with vanilla noise ("none"), linear assignment and KNN,
with identical seeds, data order and hyper-parameters; evaluates FID (and KID) of the EMA weights at a
schedule of steps with a fixed sample budget; repeats over seeds; writes to --output_dir:

    results.md      FID per step per method (mean +- std over seeds), steps each method needs to reach
                    vanilla's final FID and the speed-up ratio with its spread, wall-clock per step
    fid_vs_steps.png
    results.json    every curve, timing and setting
    runs/*.json     one file per (method, seed); a re-run with the same settings reuses finished runs

    python benchmarks/convergence.py                       # the full benchmark, ~1 hour on a 2-core CPU
    python benchmarks/convergence.py --smoke               # a few steps, one seed, tiny evaluation

Setting (defaults): MNIST 50k at 16 x 16, 1 channel; the trainer's MNIST UNet preset (channels 32-64-64, one
layer per block, attention at 8 x 8); batch 128; AdamW 3e-4 (betas 0.95/0.999, weight decay 1e-6), 100
warm-up steps then constant (a decaying schedule would make every method converge at the same place by
construction); gradient clipping 1.0; EMA with warm-up (inv_gamma 1, power 3/4, max decay 0.9999) evaluated;
1000 DDPM steps, linear betas, epsilon prediction; 1000 steps, FID every 250 steps on 1000 DDIM-25 samples
against 10,000 training digits, with the 128-d features of a classifier trained on MNIST (its accuracy is
reported); KNN with k = 8; 3 seeds.

How steps-to-target is read: the target is vanilla's final FID of the same seed (same initial weights and
data order); a run reaches it at the first evaluation where FID <= target, linearly interpolated from the
previous evaluation. Speed-up = vanilla's steps / the method's steps, per seed; a run that never reaches
the target is reported as such and left out of the ratio. A second table gives every seed a ratio: for a run
that ends worse than vanilla, the steps vanilla needed to reach that run's final FID / the run's steps (a
slow-down below 1).

Two ways to train (--backend):
- "loop" (default): a short in-process copy of `train_immiscible_ddim.py`'s loop (same data pipeline, loss,
  EMA and optimiser, built on the library), timing every step and the noise call inside it;
- "script": the real trainer, `train_immiscible_ddim.py --eval_steps ...` in a subprocess per run, its FID
  curve read from `eval_history.jsonl` and its timings from the tensorboard events it logs (the wall time
  between consecutive steps, and the assignment's own `immiscible/time_ms`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import glob
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from immiscible_pipeline import ImmiscibleNoise  # noqa: E402
from immiscible_pipeline.classifier import ClassifierTraining  # noqa: E402
from immiscible_pipeline.data import ImageTransform, TrainImages, load_mnist, sample_seed  # noqa: E402
from immiscible_pipeline.evaluation import TrainingEvaluator  # noqa: E402
from immiscible_pipeline.pixel_unet import MNIST_UNET  # noqa: E402
from immiscible_pipeline.training import averaged_weights, diffusion_loss  # noqa: E402

METHODS = ("none", "linear", "knn")
SMOKE_UNET = {"sample_size": 16, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
              "block_out_channels": (8, 16), "down_block_types": ("DownBlock2D", "DownBlock2D"),
              "up_block_types": ("UpBlock2D", "UpBlock2D"), "norm_num_groups": 4}


@dataclass
class Settings:
    steps: int = 1000
    eval_every: int = 250
    batch_size: int = 128
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    knn_k: int = 8
    eval_samples: int = 1000
    eval_inference_steps: int = 25
    num_reference: int = 10_000
    train_images: int | None = None  # None: all 50,000
    unet: dict = field(default_factory=lambda: dict(MNIST_UNET))
    classifier: dict = field(default_factory=lambda: asdict(ClassifierTraining()))

    def eval_steps(self) -> list[int]:
        steps = list(range(self.eval_every, self.steps + 1, self.eval_every))
        return steps if steps and steps[-1] == self.steps else steps + [self.steps]

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:12]


def mnist_tensor(settings: Settings) -> torch.Tensor:
    """The training images as the trainer's data pipeline makes them ([-1, 1], centre crop, no flip). The
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


def train_run(method: str, seed: int, settings: Settings, images: torch.Tensor, evaluator: TrainingEvaluator,
              log=print) -> dict:
    """One training run; returns its FID curve and per-step timings."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)  # the same initial weights for every method
    model = UNet2DModel.from_config(settings.unet)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                   model_cls=UNet2DModel, model_config=model.config)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, betas=(0.95, 0.999),
                                  weight_decay=1e-6, eps=1e-8)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer=optimizer, num_warmup_steps=settings.warmup_steps,
                                 num_training_steps=settings.steps)
    immiscible = ImmiscibleNoise(method=method, k=settings.knn_k)
    torch.manual_seed(seed + 1)  # noise and timesteps: the same stream for every method (KNN draws more of it)
    eval_at = set(settings.eval_steps())
    curve, step_ms, noise_ms, losses = [], [], [], []
    data = batches(images, settings.batch_size, seed)
    model.train()
    started = time.perf_counter()
    for step in range(1, settings.steps + 1):
        clean = next(data)
        t0 = time.perf_counter()
        noise = immiscible(clean)  # Immiscible Diffusion: the noise assigned to this batch
        t1 = time.perf_counter()
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],))
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        loss = diffusion_loss(noise_scheduler, model(noisy, timesteps).sample, clean, noise, timesteps)
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
        if step in eval_at:
            pipeline = DDIMPipeline(unet=model, scheduler=DDIMScheduler.from_config(noise_scheduler.config))
            with averaged_weights(model.parameters(), ema):
                metrics = evaluator(pipeline)
            curve.append({"step": step, **metrics, "loss": float(np.mean(losses[-50:]))})
            log(f"  {method:6s} seed {seed} step {step:5d}: FID {metrics['fid']:.3f}  KID {metrics['kid_mean']:.5f}"
                f"  loss {curve[-1]['loss']:.4f}  ({time.perf_counter() - started:.0f} s)")
    return {"method": method, "seed": seed, "curve": curve, "step_ms_median": statistics.median(step_ms),
            "noise_ms_median": statistics.median(noise_ms), "train_seconds": sum(step_ms) / 1000,
            "wall_seconds": time.perf_counter() - started}


def train_run_script(method: str, seed: int, settings: Settings, run_dir: str, cache_dir: str | None,
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
    never = str(10 * settings.steps)
    command = [sys.executable, os.path.join(REPO, "train_immiscible_ddim.py"), "--output_dir", run_dir,
               "--seed", str(seed), "--immiscible", method, "--immiscible_k", str(settings.knn_k),
               "--model_config_name_or_path", unet_config, "--train_batch_size", str(settings.batch_size),
               "--max_train_steps", str(settings.steps), "--learning_rate", str(settings.learning_rate),
               "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", str(settings.warmup_steps),
               "--use_ema", "--eval_steps", str(settings.eval_every), "--eval_feature", "classifier",
               "--eval_num_samples", str(settings.eval_samples), "--eval_inference_steps",
               str(settings.eval_inference_steps), "--eval_num_reference", str(settings.num_reference),
               "--checkpointing_steps", never, "--validation_steps", never, "--report_to", "tensorboard"]
    env = dict(os.environ, **({"IMMISCIBLE_CACHE": cache_dir} if cache_dir else {}))
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, cwd=REPO)
    with open(history) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    curve = [{"step": r["step"], "fid": r["fid"], "kid_mean": r["kid_mean"], "kid_std": r["kid_std"]} for r in records]
    for point in curve:
        log(f"  {method:6s} seed {seed} step {point['step']:5d}: FID {point['fid']:.3f}  KID {point['kid_mean']:.5f}")
    step_ms, assign_ms = tensorboard_timings(run_dir)
    return {"method": method, "seed": seed, "curve": curve, "step_ms_median": step_ms, "noise_ms_median": assign_ms,
            "timing_source": "tensorboard: wall time between logged steps; immiscible/time_ms (assignment only)",
            "wall_seconds": time.perf_counter() - started}


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

def first_reach(curve: list[dict], target: float) -> float | None:
    """Steps at which the FID curve first reaches `target` (linear interpolation between evaluations)."""
    previous = None
    for point in curve:
        if point["fid"] <= target:
            if previous is None or previous["fid"] == point["fid"]:
                return float(point["step"])
            fraction = (previous["fid"] - target) / (previous["fid"] - point["fid"])
            return previous["step"] + fraction * (point["step"] - previous["step"])
        previous = point
    return None


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def summarise(runs: list[dict], methods: list[str], seeds: list[int]) -> dict:
    by = {(r["method"], r["seed"]): r for r in runs}
    steps = [p["step"] for p in by[(methods[0], seeds[0])]["curve"]]
    fid = {m: {s: [p["fid"] for p in by[(m, s)]["curve"]] for s in seeds} for m in methods}
    reach, ratio, unreached, equal_fid = {}, {}, {}, {}
    if "none" in methods:
        for m in methods:
            reach[m], ratio[m], unreached[m], equal_fid[m] = {}, [], [], []
            for s in seeds:
                target = fid["none"][s][-1]
                mine = first_reach(by[(m, s)]["curve"], target)
                theirs = first_reach(by[("none", s)]["curve"], target)
                reach[m][s] = mine
                if mine is None:
                    unreached[m].append(s)
                    # The method ends worse: how many steps vanilla needed for the method's final FID
                    # (never, if either curve is NaN: a diverged run gets no ratio).
                    vanilla_steps = first_reach(by[("none", s)]["curve"], fid[m][s][-1])
                    if vanilla_steps is not None:
                        equal_fid[m].append(vanilla_steps / steps[-1])
                else:
                    ratio[m].append(theirs / mine)
                    equal_fid[m].append(theirs / mine)
    timing = {m: {"step_ms": statistics.median(by[(m, s)]["step_ms_median"] for s in seeds),
                  "noise_ms": statistics.median(by[(m, s)]["noise_ms_median"] for s in seeds)} for m in methods}
    return {"steps": steps, "fid": fid, "reach": reach, "ratio": ratio, "unreached": unreached,
            "equal_fid": equal_fid, "timing": timing}


def markdown(summary: dict, runs: list[dict], methods: list[str], seeds: list[int], settings: Settings,
             classifier_accuracy: float | None, wall_minutes: float, backend: str = "loop") -> str:
    by = {(r["method"], r["seed"]): r for r in runs}
    lines = [f"FID of the EMA weights (classifier features{'' if classifier_accuracy is None else f', classifier test accuracy {classifier_accuracy:.4f}'}; "
             f"{settings.eval_samples} DDIM-{settings.eval_inference_steps} samples vs {settings.num_reference} "
             f"training digits), mean ± std over {len(seeds)} seed(s) {seeds}:", "",
             "| step | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for i, step in enumerate(summary["steps"]):
        lines.append(f"| {step} | " + " | ".join(mean_std([summary['fid'][m][s][i] for s in seeds]) for m in methods) + " |")
    final_kid = {m: [by[(m, s)]["curve"][-1]["kid_mean"] for s in seeds] for m in methods}
    lines.append("| KID (final) | " + " | ".join(mean_std(final_kid[m]) for m in methods) + " |")
    if summary["reach"]:
        lines += ["", "Steps to reach vanilla's final FID (per seed: that seed's vanilla run), and the speed-up "
                      "vanilla steps / method steps:", "",
                  "| method | steps per seed | speed-up (mean ± std) | seeds not reaching it |", "|---|---|---|---|"]
        for m in methods:
            per_seed = ", ".join("never" if summary["reach"][m][s] is None else f"{summary['reach'][m][s]:.0f}"
                                 for s in seeds)
            lines.append(f"| {m} | {per_seed} | {mean_std(summary['ratio'][m])} | "
                         f"{len(summary['unreached'][m])} / {len(seeds)} |")
        lines += ["", "Speed-up at equal FID for every seed, slow-downs included: where the method reaches "
                      "vanilla's final FID, as above; where it does not, the steps vanilla needed to reach the "
                      "method's final FID / the method's steps:", "",
                  "| method | per seed | mean ± std |", "|---|---|---|"]
        for m in methods:
            values = summary["equal_fid"][m]
            lines.append(f"| {m} | {', '.join(f'{v:.2f}' for v in values)} | {mean_std(values)} |")
    base = summary["timing"].get("none", {}).get("step_ms")
    timed = "noise call" if backend == "loop" else "assignment"
    source = ("in-process loop, runs interleaved by seed" if backend == "loop" else
              "train_immiscible_ddim.py, from its tensorboard events; the assignment excludes drawing the noise")
    lines += ["", f"Wall-clock per training step (medians over steps, then over seeds; {source}):", "",
              f"| method | step (ms) | {timed} (ms) | {timed} share of the step | step vs none |", "|---|---|---|---|---|"]
    for m in methods:
        t = summary["timing"][m]
        versus = f"{t['step_ms'] / base:.3f}x" if base else "-"
        lines.append(f"| {m} | {t['step_ms']:.1f} | {t['noise_ms']:.2f} | {100 * t['noise_ms'] / t['step_ms']:.2f}% "
                     f"| {versus} |")
    unet = settings.unet
    lines += ["", f"Setting: MNIST {settings.train_images or 50000} images at {unet['sample_size']} px; UNet "
                  f"{tuple(unet['block_out_channels'])}, {unet['layers_per_block']} layer(s) per block; batch "
                  f"{settings.batch_size}; AdamW {settings.learning_rate:g}, {settings.warmup_steps} warm-up steps then "
                  f"constant; EMA with warm-up; {settings.steps} steps, FID every {settings.eval_every}; KNN k = "
                  f"{settings.knn_k}. Trainer: {backend}. Wall-clock of the runs (training and evaluation, summed): "
                  f"{sum(r['wall_seconds'] for r in runs) / 60:.1f} min; of this invocation: {wall_minutes:.1f} min."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, methods: list[str], seeds: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    steps = np.array(summary["steps"])
    for m in methods:
        values = np.array([summary["fid"][m][s] for s in seeds])  # [seeds, evals]
        mean = values.mean(0)
        ax.plot(steps, mean, marker="o", label=f"{m} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
        if len(seeds) > 1:
            std = values.std(0, ddof=1)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("FID (classifier features)")
    ax.set_yscale("log")
    ax.set_title("FID vs steps, mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 1000)")
    parser.add_argument("--eval_every", type=int, default=None, help="evaluate every N steps (default 250)")
    parser.add_argument("--eval_samples", type=int, default=None, help="samples per evaluation (default 1000)")
    parser.add_argument("--eval_inference_steps", type=int, default=None, help="DDIM steps (default 25)")
    parser.add_argument("--batch_size", type=int, default=None, help="default 128")
    parser.add_argument("--knn_k", type=int, default=None, help="default 8")
    parser.add_argument("--output_dir", default="benchmark-results/convergence")
    parser.add_argument("--cache_dir", default=None, help="classifier / reference-feature cache (default: the "
                                                          "package's, $IMMISCIBLE_CACHE or ~/.cache/immiscible_pipeline)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--backend", choices=("loop", "script"), default="loop",
                        help="loop: the in-process copy of the trainer's loop (times every step); script: the real "
                             "train_immiscible_ddim.py with --eval_steps, one subprocess per run")
    parser.add_argument("--smoke", action="store_true", help="a few steps, one seed, tiny model and evaluation")
    return parser.parse_args(argv)


def build_settings(args) -> Settings:
    if args.smoke:
        settings = Settings(steps=6, eval_every=3, batch_size=16, warmup_steps=2, eval_samples=24,
                            eval_inference_steps=2, num_reference=200, train_images=512, unet=dict(SMOKE_UNET),
                            classifier=asdict(ClassifierTraining(steps=20, max_train_images=2000,
                                                                 max_test_images=500)))
    else:
        settings = Settings()
    for name in ("steps", "eval_every", "eval_samples", "eval_inference_steps", "batch_size", "knn_k"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    return settings


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.smoke and args.seeds == [0, 1, 2]:
        args.seeds = [0]
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = build_settings(args)
    os.makedirs(os.path.join(args.output_dir, "runs"), exist_ok=True)
    started = time.perf_counter()
    print(f"convergence benchmark: methods {args.methods}, seeds {args.seeds}, {settings.steps} steps, FID at "
          f"{settings.eval_steps()} on {settings.eval_samples} samples; output {args.output_dir}")
    images = mnist_tensor(settings) if args.backend == "loop" else None
    evaluator = TrainingEvaluator(reference="mnist", num_samples=settings.eval_samples, feature="classifier",
                                  num_inference_steps=settings.eval_inference_steps, batch_size=250, seed=1234,
                                  cache_dir=args.cache_dir, num_reference=settings.num_reference,
                                  classifier_settings=ClassifierTraining(**settings.classifier), progress=False)
    prepare_start = time.perf_counter()
    evaluator.prepare(settings.unet["sample_size"], settings.unet["in_channels"])  # classifier + reference features
    accuracy = evaluator.classifier_test_accuracy
    print(f"evaluation ready in {time.perf_counter() - prepare_start:.0f} s: classifier test accuracy {accuracy:.4f}")
    runs = []
    for seed in args.seeds:  # seeds outer, methods inner: slow drifts of the shared CPU hit every method alike
        for method in args.methods:
            name = f"{method}-seed{seed}-{settings.key()}{'-script' if args.backend == 'script' else ''}"
            path = os.path.join(args.output_dir, "runs", f"{name}.json")
            if os.path.isfile(path):
                with open(path) as handle:
                    runs.append(json.load(handle))
                print(f"  {method} seed {seed}: reusing {path}")
                continue
            if args.backend == "script":
                run = train_run_script(method, seed, settings, os.path.join(args.output_dir, "runs", name),
                                       args.cache_dir)
            else:
                run = train_run(method, seed, settings, images, evaluator)
            with open(path, "w") as handle:
                json.dump(run, handle)
            runs.append(run)
    summary = summarise(runs, args.methods, args.seeds)
    wall_minutes = (time.perf_counter() - started) / 60
    table = markdown(summary, runs, args.methods, args.seeds, settings, accuracy, wall_minutes, args.backend)
    with open(os.path.join(args.output_dir, "results.md"), "w") as handle:
        handle.write(table)
    plot(summary, args.methods, args.seeds, os.path.join(args.output_dir, "fid_vs_steps.png"))
    result = {"settings": asdict(settings), "backend": args.backend, "methods": args.methods, "seeds": args.seeds, "runs": runs,
              "summary": {k: v for k, v in summary.items() if k != "fid"}, "classifier_test_accuracy": accuracy,
              "wall_minutes": wall_minutes, "torch_threads": torch.get_num_threads()}
    with open(os.path.join(args.output_dir, "results.json"), "w") as handle:
        json.dump(result, handle, indent=1, default=str)
    print(table)
    return result


if __name__ == "__main__":
    main()
