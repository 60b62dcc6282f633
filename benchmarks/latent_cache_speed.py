"""Training speed of train_immiscible_sd.py with and without --cache_latents, on a tiny SD model on the CPU.

    python benchmarks/latent_cache_speed.py            # ~4 min on 2 cores
    python benchmarks/latent_cache_speed.py --quick    # ~1.5 min

Runs the real script (`accelerate launch`, one process) on a folder of synthetic PNGs, alternating the two
modes for each repeat so that both see the same machine load, and reads the speed from the wall times of the
steps the script logs to TensorBoard (the first step, with its warm-up, is left out; start-up and the one-off
cache build are timed separately). Prints a markdown table of medians and ranges.

With images, a step decodes and resizes the PNGs and encodes them with the VAE; from the cache it reads the
stored latent mean and std and draws mean + std * eps. The saving grows with the share of the VAE in a step:
small for the tiny VAE of the tests (two blocks of 8 and 16 channels, 32 px), larger for an SD-shaped one
(four blocks of 32-128 channels, /8, 64 px), and larger still for SD's own (128-512 channels, 256-512 px).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_images", type=int, default=256)
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=25, help="Optimisation steps per run.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per mode (alternating).")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads of the training process.")
    parser.add_argument("--quick", action="store_true", help="Fewer steps and repeats (a smoke run).")
    parser.add_argument("--json", type=str, default=None, help="Also write the results to this file.")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats, args.num_images = 10, 2, 128
    return args


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    """Smooth random RGB images, larger than the resolution and not square (so they are resized and cropped),
    in two class folders named like ImageNet classes."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        width, height = (80, 64) if index % 2 else (64, 96)
        base = rng.integers(0, 256, size=(1, 1, 3))
        ramp = np.linspace(0, 120, width)[None, :, None] + np.linspace(0, 60, height)[:, None, None]
        pixels = ((base + ramp + rng.normal(0, 20, (height, width, 3))) % 256).astype(np.uint8)
        path = folder / ("tench, Tinca tinca" if index % 2 else "goldfish, Carassius auratus") / f"{index:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)


# (name, resolution, VAE block channels): the test model's VAE, and one shaped like SD's (4 blocks, /8) but narrower.
MODELS = [("tiny VAE (8-16 ch, /2), 32 px", 32, (8, 16)),
          ("SD-shaped VAE (32-128 ch, /8), 64 px", 64, (32, 64, 128, 128))]


def run(args, work: Path, name: str, resolution: int, extra: list) -> dict:
    """One training run; returns its steps/s (from step 2 on), wall time and cache build time (if any)."""
    output = work / name
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train_immiscible_sd.py"),
           "--pretrained_model_name_or_path", str(work / "model"), "--train_data_dir", str(work.parent / "images"),
           "--output_dir", str(output), "--resolution", str(resolution), "--center_crop", "--random_flip",
           "--train_batch_size", str(args.train_batch_size), "--max_train_steps", str(args.steps),
           "--checkpointing_steps", "100000", "--lr_warmup_steps", "0", "--seed", "0", "--immiscible", "linear",
           "--report_to", "tensorboard", *extra]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    times = step_wall_times(output)
    cache = re.search(r"images ready in ([0-9.]+) s", proc.stderr + proc.stdout)
    return {"steps_per_s": (len(times) - 1) / (times[-1] - times[0]), "wall_s": wall,
            "cache_build_s": float(cache.group(1)) if cache else None}


def step_wall_times(output: Path) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for events in sorted((output / "logs").rglob("events.out.tfevents*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "loss" in accumulator.Tags()["scalars"]:
            return [event.wall_time for event in accumulator.Scalars("loss")]
    raise SystemExit(f"no loss logged in {output}")


def measure(args, work: Path, resolution: int, vae_channels: tuple) -> dict:
    from immiscible_pipeline.training.tiny_stable_diffusion import build_tiny_sd

    build_tiny_sd(work / "model", resolution=resolution, vae_channels=vae_channels)
    cache = ["--cache_latents", str(work / "cache")]
    first = run(args, work, "build-cache", resolution, cache)  # builds the cache; its step speed is not counted
    results = {"images": [], "cache": []}
    for repeat in range(args.repeats):
        results["images"].append(run(args, work, f"images-{repeat}", resolution, []))
        results["cache"].append(run(args, work, f"cache-{repeat}", resolution, cache))
        print(f"  repeat {repeat + 1}/{args.repeats}: images {results['images'][-1]['steps_per_s']:.2f} steps/s, "
              f"cache {results['cache'][-1]['steps_per_s']:.2f} steps/s", file=sys.stderr)
    return {"results": results, "cache_build_s": first["cache_build_s"]}


def main():
    args = parse_args()
    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_images(Path(tmp) / "images", args.num_images)
        for name, resolution, vae_channels in MODELS:
            print(name, file=sys.stderr)
            work = Path(tmp) / f"{resolution}-{len(vae_channels)}"
            work.mkdir()
            measured[name] = measure(args, work, resolution, vae_channels)

    print(f"train_immiscible_sd.py, batch {args.train_batch_size}, {args.num_images} PNGs (64x96 and 80x64 px), "
          f"--center_crop --random_flip, {args.steps} steps per run, {args.repeats} repeats per mode alternating, "
          f"{args.threads} thread(s), load average at the end {os.getloadavg()[0]:.1f}\n")
    print("| model | images: steps/s | cache: steps/s | speed-up (median, range of per-repeat ratios) | cache build |")
    print("|---|---|---|---|---|")
    for name, found in measured.items():
        speeds = {mode: [r["steps_per_s"] for r in runs] for mode, runs in found["results"].items()}
        ratios = [c / i for c, i in zip(speeds["cache"], speeds["images"])]  # side by side, per repeat
        cells = [f"{statistics.median(speeds[mode]):.2f} ({min(speeds[mode]):.2f}-{max(speeds[mode]):.2f})"
                 for mode in ("images", "cache")]
        print(f"| {name} | {cells[0]} | {cells[1]} | {statistics.median(ratios):.2f}x ({min(ratios):.2f}-"
              f"{max(ratios):.2f}) | {found['cache_build_s']:.1f} s |")
    print("\nsteps/s: median (range) over repeats, from the script's own step times (first step left out). The "
          "cache build is one-off: it encodes every image and its mirror.")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "measured": measured}, indent=2))


if __name__ == "__main__":
    main()
