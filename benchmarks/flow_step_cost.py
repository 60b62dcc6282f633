"""Cost of a training step of train_immiscible_sd3_flux.py on tiny SD3 and Flux models, and of
train_immiscible_sd.py on a tiny SDXL, on the CPU, and the noise assignment's share of it (all LoRA rank 4).

    python benchmarks/flow_step_cost.py            # ~3 min on 2 cores
    python benchmarks/flow_step_cost.py --quick    # ~1 min

Runs the real scripts (`accelerate launch`, one process) on a folder of synthetic PNGs, for each family with KNN
(k = 4, the default) and without assignment (`--immiscible none`), alternating the runs of each repeat so that
both see the same machine load. The step time is the median difference of the wall times of consecutive logged
steps (the first step, with its warm-up, is left out); the assignment's time is the median of the
`immiscible/time_ms` the script logs. Prints a markdown table.

The tiny models (tiny_flow_models.py: one-layer transformers of width 16-32; tiny_stable_diffusion.py's SDXL:
a two-level UNet of width 16-32; all with a two-block VAE) make every step
cheap, so the assignment's share here is an upper bound of its share with real SD3 / Flux transformers, whose
step costs grow far faster than the assignment (which only touches the latents).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40, help="Optimisation steps per run.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per family and method (alternating).")
    parser.add_argument("--threads", type=int, default=1,
                        help="Torch threads of the training process (1: what `accelerate launch` sets on a CPU; the "
                             "tiny models' operations are too small to share, and two threads on a busy 2-core "
                             "machine wait on each other).")
    parser.add_argument("--quick", action="store_true", help="Fewer steps and repeats (a smoke run).")
    parser.add_argument("--json", type=str, default=None, help="Also write the results to this file.")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 12, 1
    return args


def write_images(folder: Path, count: int = 16, seed: int = 0) -> None:
    """Smooth random RGB images, larger than the resolution and not square (resized and cropped)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        width, height = (160, 128) if index % 2 else (128, 192)
        base = rng.integers(0, 256, size=(1, 1, 3))
        ramp = np.linspace(0, 120, width)[None, :, None] + np.linspace(0, 60, height)[:, None, None]
        pixels = ((base + ramp + rng.normal(0, 20, (height, width, 3))) % 256).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")


def run(script: str, model: str, images: Path, output: Path, method: str, args) -> dict:
    """One launched run of `script` (a LoRA of rank 4); returns the median step time and assignment time (ms)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process",
               str(args.threads), str(REPO / script), "--rank", "4", "--pretrained_model_name_or_path", model,
               "--train_data_dir", str(images), "--instance_prompt", "a photo of sks thing", "--resolution",
               str(args.resolution), "--train_batch_size", str(args.train_batch_size), "--max_train_steps",
               str(args.steps), "--lr_warmup_steps", "0", "--seed", "0", "--checkpointing_steps", "100000",
               "--immiscible", method, "--immiscible_k", "4", "--output_dir", str(output)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", ACCELERATE_USE_CPU="true",
               PYTHONPATH=str(REPO))
    subprocess.run(command, check=True, env=env, capture_output=True)
    (events,) = (output / "logs" / Path(script).stem).glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
    accumulator.Reload()
    walls = [event.wall_time for event in accumulator.Scalars("loss")]
    steps = [b - a for a, b in zip(walls[1:], walls[2:])]  # from the second step's end on: no warm-up
    assignment = [event.value for event in accumulator.Scalars("immiscible/time_ms")][1:]
    return {"step_ms": 1000 * statistics.median(steps), "assignment_ms": statistics.median(assignment)}


def main():
    args = parse_args()
    from benchmarks.machine_info import cpu_model_and_flags
    from immiscible_pipeline.training.tiny_flow_models import build_tiny_flux, build_tiny_sd3
    from immiscible_pipeline.training.tiny_stable_diffusion import build_tiny_sdxl

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_images(root / "images")
        flow = "train_immiscible_sd3_flux.py"
        models = {"SD3": (flow, build_tiny_sd3(root / "sd3")), "Flux": (flow, build_tiny_flux(root / "flux")),
                  "SDXL": ("train_immiscible_sd.py", build_tiny_sdxl(root / "sdxl", resolution=args.resolution))}
        for repeat in range(args.repeats):
            for family, (script, model) in models.items():
                for method in ("knn", "none"):
                    measured = run(script, model, root / "images", root / f"{family}-{method}-{repeat}", method,
                                   args)
                    results.setdefault((family, method), []).append(measured)
                    print(f"repeat {repeat} {family} {method}: {measured}", file=sys.stderr)
    cpu, logical, _ = cpu_model_and_flags()
    print(f"Machine: {cpu} ({logical} logical CPUs); load {os.getloadavg()[0]:.1f}; {args.threads} threads; "
          f"resolution {args.resolution} px (latents "
          f"4 x {args.resolution // 2} x {args.resolution // 2}), batch {args.train_batch_size}, {args.steps} steps, "
          f"{args.repeats} repeat(s); medians over steps, then over repeats.\n")
    print("| family | step, KNN k = 4 (ms) | step, no assignment (ms) | KNN / none | assignment (ms) | its share of "
          "the KNN step |")
    print("| --- | --- | --- | --- | --- | --- |")
    table = {}
    for family in ("SD3", "Flux", "SDXL"):
        knn = statistics.median(r["step_ms"] for r in results[(family, "knn")])
        none = statistics.median(r["step_ms"] for r in results[(family, "none")])
        assign = statistics.median(r["assignment_ms"] for r in results[(family, "knn")])
        table[family] = {"knn_step_ms": knn, "none_step_ms": none, "assignment_ms": assign}
        print(f"| {family} | {knn:.1f} | {none:.1f} | {knn / none:.3f} | {assign:.2f} | {assign / knn:.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "table": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
