"""What one training step of each small pixel UNet costs on this machine, and what its parameter updates cost.

    python benchmarks/unet_step_cost.py              # the presets and the demo sweep's shapes, ~1 min on 2 cores
    python benchmarks/unet_step_cost.py --quick      # a smoke run, a few seconds

The DDIM demo's UNet was chosen by this measurement (docs/tuning-log.md): most of a demo step is the UNet's
forward and backward pass, so a cheaper UNet buys more steps in the same wall clock. Torch alone, no trainer
around it: random 16 px grey input, an MSE loss, `zero_grad` + `backward` + the trainers' AdamW (`make_adamw`,
fused where the device has the kernel). A second table times the updates alone, the ones a small UNet pays per
step whatever its batch: AdamW and diffusers' EMAModel, each as a loop over tensors and in its batched forms. A
third times loading a batch of the demo's digits (the bundled MNIST at 16 px): read and resized per image
(`TrainImages`, what any dataset of files gets) against resized once, up front (`PreparedTrainImages`, what
the pixel trainers use for square arrays such as the bundled MNIST).
Every repeat runs all the variants once in turn, so each sees the same machine load; the tables give the
median over repeats, the range, and the ratio to the first row of its group, measured in the same run. The
machine and the thread count are named above each table.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.machine_info import cpu_model_and_flags  # noqa: E402
from immiscible_pipeline.training.accelerator_setup import make_adamw  # noqa: E402
from immiscible_pipeline.training.unet_presets import MNIST_DEMO_UNET, MNIST_UNET  # noqa: E402

NO_ATTENTION = {"down_block_types": ("DownBlock2D",) * 3, "up_block_types": ("UpBlock2D",) * 3}
# (name, config): the two presets, and the shapes the demo sweep compared at equal wall clock.
SHAPES = [
    ("MNIST_UNET (32, 64, 64), attention at 8 px", MNIST_UNET),
    ("the same without attention", {**MNIST_UNET, **NO_ATTENTION}),
    ("MNIST_DEMO_UNET (16, 32, 64), no attention", MNIST_DEMO_UNET),
    ("demo UNet, two layers per block", {**MNIST_DEMO_UNET, "layers_per_block": 2}),
    ("demo UNet, a fourth level (16, 32, 64, 128)", {**MNIST_DEMO_UNET, "block_out_channels": (16, 32, 64, 128),
                                                     "down_block_types": ("DownBlock2D",) * 4,
                                                     "up_block_types": ("UpBlock2D",) * 4}),
]


TRAINER_FLAGS = SimpleNamespace(learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2,
                                adam_epsilon=1e-8)


def adamw(**implementation):
    return lambda unet: torch.optim.AdamW(unet.parameters(), lr=1e-4, **implementation).step


def ema(foreach: bool):
    def updater(unet):
        from diffusers.training_utils import EMAModel

        average = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, power=0.75, foreach=foreach)
        return lambda: average.step(unet.parameters())
    return updater


# (name, builder): a builder takes a UNet whose gradients are set and returns the update to time.
UPDATES = [
    ("AdamW, a loop over tensors (torch's CPU default)", adamw(foreach=False)),
    ("AdamW, foreach", adamw(foreach=True)),
    ("AdamW, fused (the trainers', `make_adamw`)", adamw(fused=True)),
    ("EMA, a loop over tensors (EMAModel's default)", ema(foreach=False)),
    ("EMA, foreach (the trainers', `make_ema`)", ema(foreach=True)),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--repeats", type=int, default=15, help="Timed steps per shape and batch size.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps first (allocator, kernels).")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="Two shapes, batch 4, 2 repeats (a smoke run).")
    parser.add_argument("--output", type=str, default=None, help="Also write <output>.md and <output>.json.")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.repeats, args.warmup = [4], 2, 1
    return args


def machine_name() -> str:
    model, count, _ = cpu_model_and_flags()
    return f"{model}, {count} logical CPUs, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


class StepRunner:
    """One UNet with its optimiser, stepping on a fixed random batch."""

    def __init__(self, config: dict, batch_size: int, seed: int = 0):
        from diffusers import UNet2DModel

        torch.manual_seed(seed)
        self.unet = UNet2DModel(**config).train()
        self.optimizer = make_adamw(self.unet.parameters(), TRAINER_FLAGS, "cpu")
        size = config["sample_size"]
        self.inputs = torch.randn(batch_size, config["in_channels"], size, size)
        self.timesteps = torch.randint(0, 1000, (batch_size,))
        self.targets = torch.randn_like(self.inputs)
        self.parameters = sum(p.numel() for p in self.unet.parameters())

    def step(self) -> None:
        """One forward + backward + AdamW step."""
        self.optimizer.zero_grad(set_to_none=True)
        prediction = self.unet(self.inputs, self.timesteps).sample
        torch.nn.functional.mse_loss(prediction, self.targets).backward()
        self.optimizer.step()


def interleaved_ms(actions: list, repeats: int, warmup: int) -> list:
    """Milliseconds of each callable in `actions`, `repeats` times each: every action once per repeat, in turn,
    so that all see the same machine load; `warmup` untimed calls of each first."""
    for action in actions:
        for _ in range(warmup):
            action()
    times = [[] for _ in actions]
    for _ in range(repeats):
        for action, samples in zip(actions, times):
            start = time.perf_counter()
            action()
            samples.append((time.perf_counter() - start) * 1000)
    return times


def spread(samples: list) -> dict:
    return {"ms_median": statistics.median(samples), "ms_min": min(samples), "ms_max": max(samples)}


def measure(shapes, batch_sizes, repeats: int, warmup: int) -> list:
    rows = []
    for batch_size in batch_sizes:
        runners = [StepRunner(config, batch_size) for _, config in shapes]
        times = interleaved_ms([runner.step for runner in runners], repeats, warmup)
        baseline = statistics.median(times[0])
        for (name, _), runner, samples in zip(shapes, runners, times):
            rows.append({"shape": name, "batch": batch_size, "parameters": runner.parameters, **spread(samples),
                         "ratio_to_first": statistics.median(samples) / baseline})
    return rows


def measure_updates(shapes, repeats: int, warmup: int) -> list:
    """Milliseconds of each update in UPDATES, per shape (the cost does not depend on the batch), and its ratio
    to the first update of its group (AdamW or EMA: the name before the comma)."""
    from diffusers import UNet2DModel

    rows = []
    for name, config in shapes:
        torch.manual_seed(0)
        unet = UNet2DModel(**config)
        for parameter in unet.parameters():
            parameter.grad = torch.randn_like(parameter) * 1e-3
        times = interleaved_ms([build(unet) for _, build in UPDATES], repeats, warmup)
        baselines = {}
        for (update_name, _), samples in zip(UPDATES, times):
            median = statistics.median(samples)
            baseline = baselines.setdefault(update_name.split(",")[0], median)
            rows.append({"shape": name, "update": update_name, **spread(samples), "ratio_to_first": median / baseline})
    return rows


LOADERS = ["per image (TrainImages)", "resized once (PreparedTrainImages)"]


def measure_loading(batch_sizes, repeats: int, warmup: int, quick: bool) -> tuple[list, dict]:
    """Milliseconds per batch of the demo's digits from each of LOADERS, and the one-off cost of the second."""
    from immiscible_pipeline.data import (ImageTransform, PreparedTrainImages, TrainImages, load_mnist,
                                                         train_dataloader)

    digits = load_mnist("test").select(range(2000)) if quick else load_mnist("train")
    transform = ImageTransform(MNIST_DEMO_UNET["sample_size"], channels=1)  # the demo's: 28 px resized to 16 px
    start = time.perf_counter()
    prepared = PreparedTrainImages(digits, "image", transform)
    preparation = {"images": len(digits), "seconds": time.perf_counter() - start}
    rows = []
    for batch_size in batch_sizes:
        batches = [iter(train_dataloader(images, batch_size))
                   for images in (TrainImages(digits, "image", transform), prepared)]
        times = interleaved_ms([lambda batch=batch: next(batch) for batch in batches], repeats, warmup)
        baseline = statistics.median(times[0])
        rows.extend({"loader": name, "batch": batch_size, **spread(samples),
                     "ratio_to_first": statistics.median(samples) / baseline}
                    for name, samples in zip(LOADERS, times))
    return rows, preparation


def format_loading(rows: list, preparation: dict, machine: str, repeats: int) -> str:
    lines = [f"Loading a batch of the bundled MNIST at 16 px (the demo's data), ms; median of {repeats} interleaved "
             f"repeats on {machine}", "", "| loader | batch | ms per batch | range | vs per image |",
             "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['loader']} | {row['batch']} | {row['ms_median']:.2f} | {row['ms_min']:.2f}-"
                     f"{row['ms_max']:.2f} | {row['ratio_to_first']:.2f}x |")
    lines += ["", f"Resizing the {preparation['images']:,} digits once took {preparation['seconds']:.1f} s."]
    return "\n".join(lines)


def format_updates(rows: list, machine: str, repeats: int) -> str:
    lines = [f"Parameter updates alone, ms per step; median of {repeats} interleaved repeats on {machine}", "",
             "| UNet | update | ms | range | vs the loop over tensors |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['shape']} | {row['update']} | {row['ms_median']:.2f} | {row['ms_min']:.2f}-"
                     f"{row['ms_max']:.2f} | {row['ratio_to_first']:.2f}x |")
    return "\n".join(lines)


def format_table(rows: list, machine: str, repeats: int) -> str:
    lines = [f"UNet training step (forward + backward + fused AdamW), 16 px grey, ms; median of {repeats} interleaved "
             f"repeats on {machine}", "",
             "| UNet | parameters | batch | ms per step | range | vs first row |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['shape']} | {row['parameters'] / 1e6:.2f}M | {row['batch']} | {row['ms_median']:.1f} "
                     f"| {row['ms_min']:.1f}-{row['ms_max']:.1f} | {row['ratio_to_first']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = SHAPES[1:3] if args.quick else SHAPES
    rows = measure(shapes, args.batch_sizes, args.repeats, args.warmup)
    updates = measure_updates(shapes[-1:] if args.quick else [SHAPES[0], SHAPES[2]], args.repeats, args.warmup)
    loading, preparation = measure_loading(args.batch_sizes, args.repeats, args.warmup, args.quick)
    machine = machine_name()
    table = "\n\n".join([format_table(rows, machine, args.repeats), format_updates(updates, machine, args.repeats),
                          format_loading(loading, preparation, machine, args.repeats)])
    print(table)
    report = {"machine": machine, "repeats": args.repeats, "rows": rows, "updates": updates, "loading": loading,
              "preparation": preparation}
    if args.output:
        Path(args.output).with_suffix(".md").write_text(table + "\n")
        Path(args.output).with_suffix(".json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
