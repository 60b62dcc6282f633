"""Reading FID-versus-training-steps curves: the steps a run needs to reach a target FID, the speed-up at equal FID
against vanilla with Student's t interval over seeds and its verdict, and whether vanilla's curve levelled off.

One definition for the convergence benchmark (`benchmarks/convergence.py`) and for
`python -m immiscible_pipeline.compare` on a user's own runs. A curve is a list of evaluations
`{"step": ..., "fid": ..., ...}` in step order; a run is a dict with its `method`, `seed` and `curve` (or `curves`,
one per sampler setting).

How steps-to-target is read: the target is vanilla's final FID of the same seed (same initial weights and data
order); a run reaches it at the first evaluation where FID <= target, linearly interpolated from the previous
evaluation. Speed-up = vanilla's steps / the method's steps, per seed. For a run that ends worse than vanilla, the
steps vanilla needed to reach that run's final FID / the run's steps (a slow-down below 1), so that every seed has
a ratio. The verdict names a gain or a loss only where the 95% interval of the mean ratio excludes 1.
Where vanilla already stands at its final FID at its first evaluation (its curve only gets worse), no ratio can
exceed the first evaluation's resolution: the verdict then says so instead of "no clear difference", and the FIDs
are the evidence.
"""

from __future__ import annotations

import math
import statistics

CONVERGED_BELOW = 0.10  # converged: vanilla's FID improved by less than this fraction over the last doubling


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


def mean_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Student's t interval of the mean over seeds (each seed one independent run); None below 2 seeds."""
    if len(values) < 2:
        return None
    from scipy.stats import t

    half = t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    mean = statistics.mean(values)
    return mean - half, mean + half


def verdict(interval: tuple[float, float] | None) -> str:
    """What a speed-up's interval says: a gain or a loss only where it excludes 1.0 (the README's rule)."""
    if interval is None:
        return "too few seeds"
    low, high = interval
    return "faster" if low > 1 else "slower" if high < 1 else "no clear difference"


UNMEASURABLE = "not measurable: vanilla is at its final FID from its first evaluation (compare the FIDs)"


def summarise(runs: list[dict], methods: list[str], seeds: list[int]) -> dict:
    """Steps-to-target and speed-ups of runs with one FID curve each (`run["curve"]`), every (method, seed) of
    `methods` x `seeds` present and evaluated at the same steps. With the runs' `step_ms_median` and
    `noise_ms_median` (the benchmark's), also their median timings."""
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
    timed = all("step_ms_median" in run for run in by.values())
    timing = {m: {"step_ms": statistics.median(by[(m, s)]["step_ms_median"] for s in seeds),
                  "noise_ms": statistics.median(by[(m, s)]["noise_ms_median"] for s in seeds)}
              for m in methods} if timed else {}
    interval = {m: mean_interval(values) for m, values in equal_fid.items()}
    verdicts = {m: verdict(i) for m, i in interval.items()}
    if reach and all(reach["none"][s] == steps[0] for s in seeds):
        verdicts = {m: UNMEASURABLE if interval[m] is not None else v for m, v in verdicts.items()}
    return {"steps": steps, "fid": fid, "reach": reach, "ratio": ratio, "unreached": unreached,
            "equal_fid": equal_fid, "equal_fid_interval": interval, "verdict": verdicts, "timing": timing}


def value_at(steps: list[int], values: list[float], step: float) -> float | None:
    """The curve at `step` (linear interpolation between evaluations); None outside the evaluated range."""
    import numpy as np

    if not steps or step < steps[0] or step > steps[-1]:
        return None
    return float(np.interp(step, steps, values))


def convergence_check(steps: list[int], fids: list[float], threshold: float = CONVERGED_BELOW) -> dict:
    """Did the FID curve level off? Its relative improvement over the last doubling of the steps,
    1 - FID(end) / FID(end / 2), against `threshold`; also over the doubling before (the trend), when evaluated.
    A curve that got worse over the last doubling counts as converged (improvement <= 0)."""
    end = steps[-1]
    half, quarter = value_at(steps, fids, end / 2), value_at(steps, fids, end / 4)
    result = {"end_step": end, "fid_end": fids[-1], "fid_half": half, "fid_quarter": quarter,
              "improvement": None, "previous_improvement": None, "converged": None, "threshold": threshold}
    if half is None or not all(math.isfinite(v) for v in (half, fids[-1])):
        return result
    result["improvement"] = 1 - fids[-1] / half
    result["converged"] = result["improvement"] < threshold
    if quarter is not None and math.isfinite(quarter):
        result["previous_improvement"] = 1 - half / quarter
    return result


def change(improvement: float) -> str:
    """A relative FID change in words: "38.1% better" or "4.0% worse" (lower FID is better)."""
    return f"{100 * abs(improvement):.1f}% {'better' if improvement >= 0 else 'worse'}"


def describe_convergence(check: dict) -> str:
    """One line: converged? with the numbers behind it."""
    if check["improvement"] is None:
        return f"converged? unknown: no evaluation at half the run's {check['end_step']} steps"
    verdict = "yes" if check["converged"] else "no"
    line = (f"converged? {verdict}: vanilla's mean FID {check['fid_half']:.3g} at step {check['end_step'] / 2:g} -> "
            f"{check['fid_end']:.3g} at step {check['end_step']}, {change(check['improvement'])} over the last "
            f"doubling (criterion: less than {100 * check['threshold']:.0f}% better)")
    if check["previous_improvement"] is not None:
        line += f"; {change(check['previous_improvement'])} over the doubling before"
    if not check["converged"]:
        line += (f"; the budget stopped it {100 * (check['improvement'] - check['threshold']):.1f} points above "
                 "the criterion")
    return line


def curve_view(runs: list[dict], sampler_steps) -> list[dict]:
    """The runs with `curve` = their curve at this sampler setting (for `summarise`)."""
    return [{**run, "curve": run["curves"][str(sampler_steps)]} for run in runs]


def summarise_by_sampler(runs: list[dict], methods: list[str], seeds: list[int], sampler_steps: list) -> dict:
    """{sampler setting: summarise(...) of that setting's curves, with vanilla's mean curve's converged? check}."""
    result = {}
    for n in sampler_steps:
        summary = summarise(curve_view(runs, n), methods, seeds)
        if "none" in methods:
            add_convergence(summary, seeds)
        result[n] = summary
    return result


def add_convergence(summary: dict, seeds: list[int]) -> None:
    """`converged` (vanilla's mean curve over `seeds`) and `converged_per_seed` in a summary holding vanilla."""
    mean_curve = [statistics.mean(summary["fid"]["none"][s][i] for s in seeds) for i in range(len(summary["steps"]))]
    summary["converged"] = convergence_check(summary["steps"], mean_curve)
    summary["converged_per_seed"] = {s: convergence_check(summary["steps"], summary["fid"]["none"][s]) for s in seeds}


# --- writing it up ------------------------------------------------------------------------------------------

EQUAL_FID_HEADER = ["per seed", "mean ± std", "95% interval", "verdict"]


def equal_fid_cells(summary: dict, method: str) -> list[str]:
    """A method's speed-up at equal FID as table cells (EQUAL_FID_HEADER): per seed, mean ± std, interval,
    verdict ("(reference)" for vanilla)."""
    values, interval = summary["equal_fid"][method], summary["equal_fid_interval"][method]
    shown = "-" if interval is None else f"{interval[0]:.2f} to {interval[1]:.2f}"
    return [", ".join(f"{v:.2f}" for v in values) or "-", mean_std(values), shown,
            "(reference)" if method == "none" else summary["verdict"][method]]


def plot_fid_curves(panels: dict, methods: list[str], path: str, ylabel: str = "FID", title: str | None = None) -> None:
    """FID against training steps, one panel per {title: summary} (`steps`, `fid` {method: {seed: curve}}), the
    mean over each method's seeds with ± std shaded; log-log axes (steps base 2). A PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (name, summary) in zip(axes[0], panels.items()):
        steps = np.array(summary["steps"])
        for m in methods:
            if m not in summary["fid"]:
                continue
            values = np.array(list(summary["fid"][m].values()))  # [seeds, evaluations]
            mean, count = values.mean(0), len(values)
            ax.plot(steps, mean, marker="o", markersize=3, label=f"{m} ({count} seed{'s' if count > 1 else ''})")
            if count > 1:
                std = values.std(0, ddof=1)
                ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        ax.set_xlabel("training step")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
