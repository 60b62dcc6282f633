#!/usr/bin/env python
"""Which sampler for which training: the built-in demos, trained with each method by the shipped trainers, then
scored by the shipped `python -m immiscible_pipeline.evaluate` with each sampler, independent and matched
re-noising side by side.

    python benchmarks/demo_samplers.py --family cm      # cm-none, cm-linear, cm-knn4: 1, 2 (two mid-points), 4 steps
    python benchmarks/demo_samplers.py --family ddim    # DDIM eta 0 / eta 1 and DDPM ancestral at 10 and 50 steps

Models are trained once into --work_dir (`accelerate launch train_immiscible_<family>.py --immiscible M --seed S`,
the demo's defaults otherwise) and reused; every score is kept in `<work_dir>/scores/` as it is made. The
table (final FID and confident share per sampler, per method) goes to --output_dir (default
docs/sampling-demo/<family>/results.md, with results.json). A sampler is named as in sampler_study.py:
`<cm|ddim|ddpm>-<steps>[-mid<level>][-eta<e>][-matched[N]]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.machine_info import cpu_model_and_flags  # noqa: E402
from benchmarks.sampler_study import Sampler, parse_sampler  # noqa: E402

SAMPLERS = {
    "cm": ["cm-1", "cm-2", "cm-2-matched", "cm-2-mid24", "cm-2-mid24-matched", "cm-4", "cm-4-matched"],
    "ddim": ["ddim-10", "ddim-10-eta1", "ddim-10-eta1-matched", "ddpm-10", "ddpm-10-matched", "ddpm-50",
             "ddpm-50-matched", "ddpm-50-matched10", "ddim-50", "ddim-50-eta1", "ddim-50-eta1-matched"],
}
METHODS = {"cm": ["none", "linear", "knn4"], "ddim": ["none", "linear", "knn8"]}


def method_flags(name: str) -> list[str]:
    if name.startswith("knn"):
        return ["--immiscible", "knn", "--immiscible_k", name[3:]]
    return ["--immiscible", name]


def train(family: str, name: str, seed: int, folder: str, threads: int) -> float:
    """The demo of `family` trained with method `name` into `folder` (skipped if it holds a pipeline); seconds."""
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return 0.0
    started = time.perf_counter()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", str(threads),
               os.path.join(REPO, f"train_immiscible_{family}.py"), "--output_dir", folder, "--seed", str(seed),
               "--report_to", "none", *method_flags(name)]
    print(f"training {name} seed {seed}: {' '.join(command[2:])}", flush=True)
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def evaluate_args(sampler: Sampler, folder: str, output_json: str, args) -> list:
    """The `python -m immiscible_pipeline.evaluate` command line of one score."""
    argv = ["--model", folder, "--reference", "mnist", "--feature", "classifier", "--num_samples",
            str(args.num_samples), "--num_reference", str(args.num_reference), "--classifier_steps",
            str(args.classifier_steps), "--output_json", output_json,
            "--renoise", "matched" if sampler.matched else "independent"]
    if sampler.mid is not None:
        argv += ["--timesteps", str(sampler.mid), "0"]
    else:
        argv += ["--num_inference_steps", str(sampler.steps)]
    if sampler.scheduler in ("ddim", "ddpm"):
        argv += ["--scheduler", sampler.scheduler, "--eta", str(sampler.eta)]
    if sampler.matched:  # -matched: every re-noising; -matchedN: the first N
        argv += ["--matched_steps", "all" if sampler.matched_steps is None else str(sampler.matched_steps)]
    if args.cache_dir:
        argv += ["--cache_dir", args.cache_dir]
    return argv


def score(sampler: Sampler, name: str, folder: str, args, coupled: bool) -> dict:
    """One (model, sampler) score, read from the kept file if it exists. A vanilla model has no coupling to
    match: its matched sampler is scored as the independent one."""
    from immiscible_pipeline.evaluation import cli as evaluate

    os.makedirs(os.path.join(args.work_dir, "scores"), exist_ok=True)
    path = os.path.join(args.work_dir, "scores", f"{os.path.basename(folder)}-{sampler.name}-{args.num_samples}.json")
    if not os.path.isfile(path):
        if sampler.matched and not coupled:
            unmatched = parse_sampler(sampler.name.split("-matched")[0], args.family)
            return score(unmatched, name, folder, args, coupled)
        started = time.perf_counter()
        evaluate.main(evaluate_args(sampler, folder, path + ".partial", args))
        os.replace(path + ".partial", path)
        print(f"  {name:7s} {sampler.name:22s} ({time.perf_counter() - started:.0f} s)", flush=True)
    with open(path) as handle:
        return json.load(handle)


def markdown(family: str, methods: list[str], samplers: list[Sampler], table: dict, seeds: list[int],
             num_samples: int, machine: str, train_seconds: dict, threads: int) -> str:
    def cell(values: list[float], digits: str) -> str:
        if len(values) == 1:
            return format(values[0], digits)
        return f"{statistics.mean(values):{digits}} ± {statistics.stdev(values):.2g}"

    lines = [f"# Which sampler for which training: the {family.upper()} demo", "",
             f"The built-in demo of `train_immiscible_{family}.py` trained with each method (seeds {seeds}), each "
             f"saved pipeline scored by `python -m immiscible_pipeline.evaluate` on {num_samples} samples against "
             "MNIST training digits, classifier features (FID; and the share of samples the classifier "
             "labels with confidence >= 0.9). Matched re-noising: the injected noise paired with the clean estimates "
             "as training paired noise with images; independent: stock diffusers.", "",
             "| sampler | " + " | ".join(f"{m}: FID" for m in methods) + " | " +
             " | ".join(f"{m}: readable" for m in methods) + " |", "|---|" + "---|" * (2 * len(methods))]
    for sampler in samplers:
        fids = [cell([table[(m, s, sampler.name)]["fid"] for s in seeds], ".3g") for m in methods]
        readable = [cell([table[(m, s, sampler.name)]["confident_fraction"] for s in seeds], ".3f") for m in methods]
        lines.append(f"| {sampler.describe()} | " + " | ".join(fids + readable) + " |")
    trained = ", ".join(f"{m} {sec / 60:.1f} min" for m, sec in train_seconds.items() if sec)
    lines += ["", f"Machine: {machine}." + (f" Training of this invocation ({threads} threads each, machine shared): "
                                             f"{trained}." if trained else ""), ""]
    return "\n".join(lines)


def plot(family: str, methods: list[str], samplers: list[Sampler], table: dict, seeds: list[int], path: str) -> None:
    """FID per sampler (rows) and method (bars), mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(samplers) * len(methods) / 2 + 1.5))
    height = 0.8 / len(methods)
    rows = np.arange(len(samplers))
    for i, method in enumerate(methods):
        fids = [statistics.mean(table[(method, s, sampler.name)]["fid"] for s in seeds) for sampler in samplers]
        ax.barh(rows + i * height, fids, height, label=method)
    ax.set_yticks(rows + height * (len(methods) - 1) / 2, [sampler.describe() for sampler in samplers], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("FID (classifier features), lower is better")
    ax.set_title(f"{family.upper()} demo: FID per sampler and training method")
    ax.legend()
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("cm", "ddim"), required=True)
    parser.add_argument("--methods", nargs="+", default=None, help="default: none linear knn4 (cm), knn8 (ddim)")
    parser.add_argument("--samplers", nargs="+", default=None, help="default: the family's list (see SAMPLERS)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--num_reference", type=int, default=10_000)
    parser.add_argument("--classifier_steps", type=int, default=1500, help="the feature classifier's training steps")
    parser.add_argument("--threads", type=int, default=1, help="threads of each training run")
    parser.add_argument("--work_dir", default=None,
                        help="models and scores (default benchmark-results/demo-samplers/<family>)")
    parser.add_argument("--output_dir", default=None, help="default docs/sampling-demo/<family>")
    parser.add_argument("--cache_dir", default=None, help="classifier / reference-feature cache")
    args = parser.parse_args(argv)
    args.methods = args.methods or METHODS[args.family]
    args.work_dir = args.work_dir or os.path.join(REPO, "benchmark-results", "demo-samplers", args.family)
    args.output_dir = args.output_dir or os.path.join(REPO, "docs", "sampling-demo", args.family)
    try:
        args.parsed = [parse_sampler(name, args.family) for name in args.samplers or SAMPLERS[args.family]]
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    model, count, _ = cpu_model_and_flags()
    machine = f"{model} ({count} logical CPUs)" if count else model
    from immiscible_pipeline import TrainingCoupling

    table, train_seconds = {}, {}
    for seed in args.seeds:
        for name in args.methods:
            folder = os.path.join(args.work_dir, f"{args.family}-{name}-seed{seed}")
            train_seconds[f"{name} seed {seed}"] = train(args.family, name, seed, folder, args.threads)
            coupling = TrainingCoupling.load(folder)
            for sampler in args.parsed:
                table[(name, seed, sampler.name)] = score(sampler, name, folder, args,
                                                          coupled=coupling is not None and coupling.is_coupled)
    text = markdown(args.family, args.methods, args.parsed, table, args.seeds, args.num_samples, machine, train_seconds,
                    args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.md"), "w") as handle:
        handle.write(text)
    result = {"family": args.family, "methods": args.methods, "seeds": args.seeds, "num_samples": args.num_samples,
              "machine": machine, "scores": {f"{m}/seed{s}/{n}": v for (m, s, n), v in table.items()}}
    with open(os.path.join(args.output_dir, "results.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    plot(args.family, args.methods, args.parsed, table, args.seeds, os.path.join(args.output_dir, "fid_by_sampler.png"))
    print(text)
    return result


if __name__ == "__main__":
    main()
