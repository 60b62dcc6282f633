"""`convergence.py --reevaluate`: finished runs scored again with other samplers, from their kept weights.

A sampler is named `<scheduler>-<steps>[-eta<e>][-matched]`:
    cm-1, cm-2, cm-2-matched, cm-4-matched       consistency sampling (the family's pipeline)
    cm-2-mid24-matched                           two steps through the saved grid's level 24 (`timesteps=[24, 0]`)
    ddim-10, ddim-50-eta1, ddim-50-eta1-matched  DDIMPipeline with that eta
    ddpm-10, ddpm-50-matched                     DDPMPipeline: DDPM ancestral steps on the same training schedule
`-matched` re-noises with the run's training coupling (`immiscible_pipeline.matched_renoise`; the group size is
the run's batch, the k its KNN k), `-matchedN` only the first N re-noisings of each sampling run; without it the
sampler re-noises independently, as stock diffusers does.

Every (run, sampler, step) score is kept in `<output_dir>/samplers/scores/<run>.json` as soon as it is made, so
an interrupted study resumes where it stopped; the tables and the plot are written from those files.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
import time
from dataclasses import dataclass

SPEC = re.compile(r"(?P<scheduler>cm|ddim|ddpm)-(?P<steps>\d+)(?:-mid(?P<mid>\d+))?(?:-eta(?P<eta>[0-9.]+))?"
                  r"(?P<matched>-matched(?P<first>\d+)?)?")
FAMILY_OF = {"cm": "cm", "ddim": "ddim", "ddpm": "ddim"}


@dataclass(frozen=True)
class Sampler:
    name: str
    scheduler: str
    steps: int
    eta: float
    matched: bool
    matched_steps: int | None = None  # couple only the first this many re-noisings (None: all)
    mid: int | None = None  # two-step consistency sampling: the middle level's index on the saved grid

    def describe(self) -> str:
        kind = {"cm": "consistency sampling", "ddim": "DDIM", "ddpm": "DDPM ancestral"}[self.scheduler]
        eta = f", eta {self.eta:g}" if self.scheduler == "ddim" else ""
        first = "" if self.matched_steps is None else f" (first {self.matched_steps})"
        renoise = "" if not self.renoises() else f", matched re-noising{first}" if self.matched else \
            ", independent re-noising"
        mid = "" if self.mid is None else f" via level {self.mid}"
        return f"{kind}, {self.steps} step{'s' if self.steps > 1 else ''}{mid}{eta}{renoise}"

    def pipeline_kwargs(self) -> dict | None:
        return None if self.mid is None else {"timesteps": [self.mid, 0]}

    def renoises(self) -> bool:
        return self.scheduler == "ddpm" or (self.scheduler == "ddim" and self.eta > 0) or (
            self.scheduler == "cm" and self.steps > 1)


def parse_sampler(name: str, family: str) -> Sampler:
    match = SPEC.fullmatch(name)
    if match is None:
        raise ValueError(f"unknown sampler {name!r}: use <cm|ddim|ddpm>-<steps>[-eta<e>][-matched], e.g. cm-2-matched "
                         "or ddpm-50")
    if FAMILY_OF[match["scheduler"]] != family:
        raise ValueError(f"sampler {name!r} does not sample the {family} family")
    if match["eta"] is not None and match["scheduler"] != "ddim":
        raise ValueError(f"sampler {name!r}: only ddim takes an eta")
    if match["mid"] is not None and (match["scheduler"] != "cm" or match["steps"] != "2"):
        raise ValueError(f"sampler {name!r}: only two-step consistency sampling (cm-2) takes a mid-point")
    return Sampler(name, match["scheduler"], int(match["steps"]), float(match["eta"] or 0.0), bool(match["matched"]),
                   int(match["first"]) if match["first"] else None, int(match["mid"]) if match["mid"] else None)


def uncoupled_twin(sampler: Sampler) -> str:
    """The name of the same sampler with stock, independent re-noising."""
    return sampler.name.split("-matched")[0]


def sampling_pipeline(sampler: Sampler, objective, model, coupling):
    """The family's pipeline around `model` (DDPM's for `ddpm`), re-noising as the sampler says."""
    from diffusers import DDPMPipeline, DDPMScheduler

    from immiscible_pipeline import matched_renoise

    pipeline = objective.pipeline(model)
    config = pipeline.scheduler.config
    if sampler.scheduler == "ddpm":
        pipeline = DDPMPipeline(unet=model, scheduler=DDPMScheduler.from_config(config))
    else:  # a scheduler of its own: the objective's may be shared, and matched re-noising changes it
        pipeline.scheduler = type(pipeline.scheduler).from_config(config)
    return matched_renoise(pipeline, coupling, sampler.matched_steps) if sampler.matched else pipeline


def load_scores(path: str) -> dict:
    if os.path.isfile(path):
        with open(path) as handle:
            return json.load(handle)
    return {}


def save_scores(path: str, scores: dict) -> None:
    with open(path + ".partial", "w") as handle:
        json.dump(scores, handle, indent=1)
    os.replace(path + ".partial", path)


def score_run(run_name: str, method: str, k: int, weights_dir: str, steps: list[int], samplers: list[Sampler],
              settings, objective, evaluator, scores_path: str, log=print) -> dict:
    """{sampler name: FID curve over `steps`} of one run, computing only what `scores_path` does not hold yet."""
    import torch
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    from immiscible_pipeline.renoise import coupling_of_run

    scores = load_scores(scores_path)
    coupling = coupling_of_run(method, k, settings.batch_size, "local", 1)
    model = UNet2DModel.from_config(settings.unet).eval()
    for step in steps:
        missing = [s for s in samplers if str(step) not in scores.get(s.name, {})]
        if not missing:
            continue
        path = os.path.join(weights_dir, f"step-{step:06d}.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: train the run again with --retrain_missing_weights")
        model.load_state_dict(load_file(path))
        for sampler in sorted(missing, key=lambda s: s.matched):  # the independent twins first (see below)
            twin = uncoupled_twin(sampler)
            if method == "none" and sampler.matched and str(step) in scores.get(twin, {}):
                # Nothing to couple: matched re-noising of a vanilla run is the stock sampler, image for image
                # (tests/test_matched_renoise.py), so its score is the independent twin's, not drawn again.
                scores.setdefault(sampler.name, {})[str(step)] = dict(scores[twin][str(step)], same_as=twin)
                save_scores(scores_path, scores)
                continue
            started = time.perf_counter()
            evaluator.eta, evaluator.pipeline_kwargs = sampler.eta, sampler.pipeline_kwargs()
            with torch.no_grad():
                metrics = evaluator(sampling_pipeline(sampler, objective, model, coupling),
                                    num_inference_steps=sampler.steps)
            scores.setdefault(sampler.name, {})[str(step)] = metrics
            save_scores(scores_path, scores)
            log(f"  {run_name} step {step:5d} {sampler.name:22s} FID {metrics['fid']:.3f} "
                f"({time.perf_counter() - started:.0f} s)")
    return {s.name: [{"step": step, **scores[s.name][str(step)]} for step in steps] for s in samplers}


def markdown(summaries: dict, samplers: list[Sampler], methods: list[str], seeds: list[int], settings, steps,
             num_samples: int, accuracy, machine: str, minutes: float, mean_std) -> str:
    """The study's tables; `mean_std` formats a list of per-seed values (the convergence benchmark's)."""
    streams = ("the seeds and noise streams of the runs in `../runs` (`--seed_streams overlapping`)"
               if settings.seed_streams == "overlapping" else "the trainers' seed streams")
    lines = [f"# Sampler study: {settings.family}", "",
             f"The runs of `docs/convergence/{settings.family}`'s settings (key {settings.key()}: {streams}; "
             f"{'trained without FID, listed in `runs/`' if not settings.train_eval else 'the evaluated runs'}), "
             f"their EMA weights kept at steps {steps} "
             f"and scored again with each sampler: FID on classifier features (test accuracy {accuracy:.4f}), "
             f"{num_samples} samples vs {settings.num_reference} training digits, mean ± std over {len(seeds)} "
             f"seed(s) {seeds}. Independent re-noising is stock diffusers; matched re-noising couples every injected "
             "noise to the current clean estimate as the run's training coupled noise to images.", "",
             "## Final FID per sampler", "", "| sampler | " + " | ".join(methods) + " |",
             "|---|" + "---|" * len(methods)]
    for sampler in samplers:
        summary = summaries[sampler.name]
        cells = [mean_std([summary["fid"][m][s][-1] for s in seeds]) for m in methods]
        lines.append(f"| {sampler.describe()} | " + " | ".join(cells) + " |")
    lines += ["", "## Speed-up at equal FID against vanilla with the same sampler", ""]
    if "none" not in methods:  # a study of the methods alone, e.g. one method's runs added to finished vanilla ones
        lines.append("Not computed: this invocation holds no vanilla runs (`--methods` without `none`).")
    elif methods == ["none"]:
        lines.append("Not computed: this invocation holds vanilla runs only (nothing to compare them with).")
    else:
        lines += speed_up_table(summaries, samplers, methods, mean_std)
    lines += ["", f"Machine: {machine}. Wall-clock of this invocation: {minutes:.1f} min (scores kept by earlier "
              "invocations are read, not made again).", ""]
    return "\n".join(lines)


def speed_up_table(summaries: dict, samplers: list[Sampler], methods: list[str], mean_std) -> list[str]:
    lines = ["Per seed, the steps vanilla needs for the method's final FID / the method's steps (as in the "
             "convergence benchmark); Student's t 95% interval of the mean over seeds; a gain or a loss only where it "
             "excludes 1.0.", "", "| sampler | " + " | ".join(m for m in methods if m != "none") + " |",
             "|---|" + "---|" * (len(methods) - 1)]
    for sampler in samplers:
        summary = summaries[sampler.name]
        cells = []
        for m in methods:
            if m == "none":
                continue
            values, interval = summary["equal_fid"][m], summary["equal_fid_interval"][m]
            shown = "" if interval is None else f" ({interval[0]:.2f}-{interval[1]:.2f}, {summary['verdict'][m]})"
            cells.append((mean_std(values) if values else "never reached") + shown)
        lines.append(f"| {sampler.describe()} | " + " | ".join(cells) + " |")
    return lines


def plot(summaries: dict, samplers: list[Sampler], methods: list[str], seeds: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    columns = min(4, len(samplers))
    rows = -(-len(samplers) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.4 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(samplers):]:
        ax.set_visible(False)
    for ax, sampler in zip(axes.flat, samplers):
        summary = summaries[sampler.name]
        for m in methods:
            values = np.array([summary["fid"][m][s] for s in seeds])
            ax.plot(summary["steps"], values.mean(0), marker="o", markersize=3, label=m)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(textwrap.fill(sampler.describe(), 40), fontsize=8)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("FID (classifier features)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
