"""`python -m immiscible_pipeline.compare RUN_DIR...`: does immiscible training reach vanilla's FID in fewer steps
on these runs?

Reads the runs (trainer output folders trained with --eval_steps, or the convergence benchmark's run files; see
`run_records`), refuses runs that differ in anything but method and seed, and prints per sampler setting (the
step count and re-noising each evaluation recorded) a markdown table: final FID per method, the steps each seed
needs to reach its vanilla run's final FID, the speed-up at equal FID per seed with its mean, Student's t 95%
interval and verdict, and whether vanilla's curve levelled off. The numbers come from `fid_curves`, the code of
the convergence benchmark's own tables. --plot draws FID against training steps, --json writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap

from . import fid_curves
from .run_records import SamplerSetting, check_comparable, read_runs

EXPLANATION = (
    "Per seed, the speed-up at equal FID is measured against the vanilla run of the same seed: where the method "
    "reaches vanilla's final FID, vanilla's steps to that FID / the method's steps to it; where it ends worse, the "
    "steps vanilla needed for the method's final FID / the method's steps (below 1: slower). Steps are read between "
    "evaluations by linear interpolation. The interval is Student's t 95% interval of the mean over seeds; the "
    "verdict says faster or slower only where it excludes 1.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m immiscible_pipeline.compare",
        description="Speed-up at equal FID of immiscible runs against vanilla ones, per sampler setting, from the "
                    "trainers' eval_history.jsonl (train with --eval_steps) or the convergence benchmark's runs.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="trainer output folders (vanilla, --immiscible none, and immiscible runs, one per seed), "
                             "or convergence benchmark run files or folders of them (docs/convergence/ddim/runs)")
    parser.add_argument("--plot", metavar="PNG", help="draw FID against training steps, one panel per sampler setting")
    parser.add_argument("--json", metavar="FILE", help="write the numbers as JSON")
    return parser.parse_args(argv)


def method_order(method: str):
    """none, linear, then KNN by k."""
    match = re.fullmatch(r"knn(\d+)", method)
    return (0, 0) if method == "none" else (1, 0) if method == "linear" else (2, int(match[1])) if match else (3, 0)


def vanilla_curve(run, setting: SamplerSetting):
    """Vanilla's curve at `setting`. Vanilla has no coupling to match, so its evaluations at the same step count
    stand for every re-noising (the trainers record them as independent)."""
    if setting in run.curves:
        return run.curves[setting]
    same_steps = [curve for other, curve in run.curves.items() if other.steps == setting.steps]
    return same_steps[0] if len(same_steps) == 1 else None


def compare_setting(runs, setting: SamplerSetting) -> dict:
    """One sampler setting: a row per method ({seeds, final_fid, reach, equal_fid, interval, verdict, cells,
    fid}) and vanilla's converged? check; `skipped` says why a setting cannot be compared."""
    curves = []
    for run in runs:
        curve = vanilla_curve(run, setting) if run.method == "none" else run.curves.get(setting)
        if curve:
            curves.append({"method": run.method, "seed": run.seed, "curve": curve, "source": run.source})
    label = setting.describe()
    vanilla_seeds = sorted(c["seed"] for c in curves if c["method"] == "none")
    if not vanilla_seeds:
        return {"label": label, "skipped": "no vanilla run was evaluated with this sampler"}
    grids: dict[tuple, list[str]] = {}
    for c in curves:
        grids.setdefault(tuple(p["step"] for p in c["curve"]), []).append(c["source"])
    if len(grids) > 1:
        shown = "; ".join(f"{list(steps)} in {', '.join(sources)}" for steps, sources in grids.items())
        raise ValueError(f"{label}: the runs were evaluated at different training steps ({shown}); compare needs "
                         "the same --eval_steps and --max_train_steps and finished runs")
    vanilla = fid_curves.summarise(curves, ["none"], vanilla_seeds)
    fid_curves.add_convergence(vanilla, vanilla_seeds)
    rows, notes = {"none": row(vanilla, "none", vanilla_seeds)}, []
    for method in sorted({c["method"] for c in curves} - {"none"}, key=method_order):
        own = {c["seed"] for c in curves if c["method"] == method}
        seeds, unpaired = sorted(own & set(vanilla_seeds)), sorted(own - set(vanilla_seeds))
        if unpaired:
            notes.append(f"{method} seed(s) {', '.join(map(str, unpaired))} left out: no vanilla run of that seed")
        if not seeds:
            continue
        pair = [c for c in curves if c["method"] in ("none", method) and c["seed"] in seeds]
        rows[method] = row(fid_curves.summarise(pair, ["none", method], seeds), method, seeds)
    return {"label": label, "steps": vanilla["steps"], "rows": rows, "notes": notes,
            "converged": vanilla["converged"], "converged_per_seed": vanilla["converged_per_seed"]}


def row(summary: dict, method: str, seeds: list[int]) -> dict:
    return {"seeds": seeds, "final_fid": [summary["fid"][method][s][-1] for s in seeds],
            "reach": [summary["reach"][method][s] for s in seeds], "equal_fid": summary["equal_fid"][method],
            "interval": summary["equal_fid_interval"][method], "verdict": summary["verdict"][method],
            "cells": fid_curves.equal_fid_cells(summary, method), "fid": summary["fid"][method]}


def compare_runs(runs) -> dict:
    """{setting label: compare_setting(...)} for every sampler setting an immiscible run was evaluated with."""
    settings = {setting for run in runs if run.method != "none" for setting in run.curves}
    return {s.describe(): compare_setting(runs, s) for s in sorted(settings, key=SamplerSetting.sort_key)}


def markdown(result: dict, runs) -> str:
    methods = sorted({run.method for run in runs}, key=method_order)
    seeds = {m: ", ".join(str(r.seed) for r in sorted(runs, key=lambda r: r.seed) if r.method == m) for m in methods}
    measured = sorted({run.measured_with for run in runs if run.measured_with})
    lines = ["# Speed-up at equal FID against vanilla", "",
             wrap(f"{len(runs)} runs: " + "; ".join(f"{m} (seed{'s' * (',' in seeds[m])} {seeds[m]})" for m in methods)
                  + (f". FID on {'; '.join(measured)}." if measured else ".")), "", wrap(EXPLANATION), ""]
    header = ["method", "seeds", "final FID", "steps to vanilla's final FID", "speed-up per seed",
              *fid_curves.EQUAL_FID_HEADER[1:]]
    for summary in result.values():
        lines += [f"## {summary['label']}", ""]
        if "skipped" in summary:
            lines += [f"Not compared: {summary['skipped']}.", ""]
            continue
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for method, r in summary["rows"].items():
            reach = ", ".join("never" if steps is None else f"{steps:.0f}" for steps in r["reach"])
            lines.append(f"| {method} | {', '.join(map(str, r['seeds']))} | {fid_curves.mean_std(r['final_fid'])} | "
                         f"{reach} | " + " | ".join(r["cells"]) + " |")
        per_seed = ", ".join("-" if c["improvement"] is None else fid_curves.change(c["improvement"])
                             for c in summary["converged_per_seed"].values())
        lines += ["", wrap(fid_curves.describe_convergence(summary["converged"]) + f" (per seed: {per_seed})."),
                  *[wrap(f"Note: {note}.") for note in summary["notes"]], ""]
    return "\n".join(lines)


def wrap(text: str) -> str:
    """Prose at a width that reads in a terminal and in a markdown file (tables are left as they are)."""
    return textwrap.fill(text, width=110, break_on_hyphens=False)


def plot(result: dict, runs, path: str) -> None:
    panels = {label: {"steps": s["steps"], "fid": {m: r["fid"] for m, r in s["rows"].items()}}
              for label, s in result.items() if "rows" in s}
    if not panels:
        raise ValueError("nothing to plot: no sampler setting could be compared")
    measured = sorted({run.measured_with.split(",")[0] for run in runs if run.measured_with})
    fid_curves.plot_fid_curves(panels, sorted({run.method for run in runs}, key=method_order), path,
                               f"FID ({'; '.join(measured)})" if measured else "FID",
                               "FID vs training steps, mean ± std over seeds")


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        runs = read_runs(args.runs)
        check_comparable(runs)
        result = compare_runs(runs)
        if args.plot:
            plot(result, runs, args.plot)
    except (ValueError, FileNotFoundError) as error:
        print(f"compare: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(markdown(result, runs))
    if args.plot:
        print(f"Plot: {args.plot}")
    if args.json:
        numbers = {label: {key: value for key, value in s.items() if key != "rows"} | (
            {"rows": {m: {k: v for k, v in r.items() if k != "cells"} for m, r in s["rows"].items()}}
            if "rows" in s else {}) for label, s in result.items()}
        with open(args.json, "w") as handle:
            json.dump({"runs": [{"source": r.source, "method": r.method, "seed": r.seed} for r in runs],
                       "settings": numbers}, handle, indent=1)
    return result
