"""Every command of docs/reproduce-on-gpus.md runs: each training command for one step on tiny local data (in
this process), then the page's evaluation commands on what it trained.

Only what needs a download or a GPU-sized budget is replaced; every other flag is kept as written:
- data: --dataset_name / --train_data_dir -> the tiny image folder of conftest.py (the labelled one of
  sd_fixtures.py for SD, whose `label` column the page's --caption_column names); --image_column dropped;
- model: the pixel trainers get the tiny 8 px UNet config and --resolution 8, SD gets the tiny SD folder
  and --resolution 16;
- budget: --max_train_steps 1; evaluation sample counts (--eval_num_samples, --num_samples 2,
  --samples_per_class 1) and reference counts (12, the folder's size); of the sampler step counts
  (--eval_inference_steps, --num_inference_steps) the first only: each count's FID costs about 3 s on the
  2048-d Inception features, and the per-count evaluations are tested with the trainers and `evaluate`;
- fp16 mixed precision (SD) runs as bf16: this CPU has no fp16 autocast for training.
The `accelerate launch` options (--multi_gpu --num_processes 4) are not exercised: one process runs here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState, GradientState
from sd_fixtures import labelled_folder, one_thread, tiny_sd  # noqa: F401 (fixtures)
from trainer_runs import load_script, run_in_process

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "reproduce-on-gpus.md"
TRAINERS = ("train_immiscible_ddim.py", "train_immiscible_cm.py", "train_immiscible_flow.py", "train_immiscible_sd.py")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: two threads waiting on each other are slower


def page_sections() -> dict[str, list[list[str]]]:
    """{section title: its commands as argv lists}, from the page's bash blocks; continuation lines joined and
    one-line `for VAR in a b; do ...; done` loops expanded."""
    sections = {}
    for chunk in PAGE.read_text().split("\n## ")[1:]:
        title, _, body = chunk.partition("\n")
        commands = []
        for block in re.findall(r"```bash\n(.*?)```", body, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                loop = re.fullmatch(r"for (\w+) in (.+?); do (.+); done", line)
                if loop:
                    variable, values, body_command = loop.groups()
                    commands += [shlex.split(body_command.replace(f"${variable}", value)) for value in values.split()]
                else:
                    commands.append(shlex.split(line))
        if commands:
            sections[title] = commands
    return sections


SECTIONS = page_sections()


def options(argv: list[str]) -> list[list[str]]:
    """[[flag, values...], ...] from an argument list (a flag's values run until the next --flag)."""
    grouped = []
    for token in argv:
        if token.startswith("--"):
            grouped.append([token])
        else:
            grouped[-1].append(token)
    return grouped


def replaced(argv: list[str], changes: dict) -> list[str]:
    """`argv` with each flag in `changes` set to its new value(s) (None drops it); flags not there are added."""
    result, seen = [], set()
    for flag, *values in options(argv):
        seen.add(flag)
        if flag in changes:
            if changes[flag] is not None:
                result += [flag, *map(str, changes[flag] if isinstance(changes[flag], list) else [changes[flag]])]
        else:
            result += [flag, *values]
    for flag, value in changes.items():
        if flag not in seen and value is not None:
            result += [flag, *map(str, value if isinstance(value, list) else [value])]
    return result


def split_launch(argv: list[str]) -> tuple[str, list[str]]:
    """(trainer file name, its arguments) of `accelerate launch [launch options] trainer.py args`."""
    assert argv[:2] == ["accelerate", "launch"], argv
    script = next(i for i, token in enumerate(argv) if token.endswith(".py"))
    return argv[script], argv[script + 1:]


def test_the_page_has_every_setting_with_vanilla_and_immiscible_side_by_side():
    assert list(SECTIONS) == ["CIFAR-10, DDIM", "CIFAR-10, consistency model", "CIFAR-10, flow matching",
                              "CelebA 64 px, consistency model",
                              "Stable Diffusion on ImageNet 256 px: fine-tuning SD v1.4 and training from scratch"]
    for title, commands in SECTIONS.items():
        trainings = [dict((o[0], o[1:]) for o in options(split_launch(c)[1])) for c in commands if c[0] == "accelerate"]
        methods = [(flags["--immiscible"][0], flags.get("--immiscible_k", [""])[0]) for flags in trainings]
        assert ("none", "") in methods and ("linear", "") in methods, title
        # Side by side: the runs differ only in the method and the output folder.
        same = [{k: v for k, v in flags.items() if k not in ("--immiscible", "--immiscible_k", "--assignment_scope",
                                                              "--output_dir")} for flags in trainings]
        assert len({repr(sorted(s.items())) for s in same}) == (1 if "Stable" not in title else 2), title
        evaluated = [c for c in commands if c[:3] == ["python", "-m", "immiscible_pipeline.evaluate"]]
        models = {dict((o[0], o[1:]) for o in options(c[3:]))["--model"][0] for c in evaluated}
        assert models == {flags["--output_dir"][0] for flags in trainings}, title  # every trained model is scored
        assert all("inception" in c for c in evaluated)


def test_the_papers_settings_are_the_ones_written():
    flags = {title: [dict((o[0], o[1:]) for o in options(split_launch(c)[1])) for c in commands if c[0] == "accelerate"]
             for title, commands in SECTIONS.items()}
    ddim = flags["CIFAR-10, DDIM"][0]
    assert (ddim["--train_batch_size"], ddim["--learning_rate"], ddim["--resolution"]) == (["128"], ["2e-4"], ["32"])
    assert {f.get("--immiscible_k", ["-"])[0] for f in flags["CIFAR-10, DDIM"]} == {"-", "8"}
    assert {f.get("--immiscible_k", ["-"])[0] for f in flags["CIFAR-10, consistency model"]} == {"-", "4"}
    assert {f.get("--immiscible_k", ["-"])[0] for f in flags["CIFAR-10, flow matching"]} == {"-", "4"}
    # the papers' set-ups by name: the DDIM trainer's dataset default is diffusers' train_unconditional.py
    assert {f["--recipe"][0] for f in flags["CIFAR-10, DDIM"] + flags["CIFAR-10, flow matching"]} == {"cifar10-paper"}
    assert flags["CelebA 64 px, consistency model"][0]["--resolution"] == ["64"]
    sd = flags["Stable Diffusion on ImageNet 256 px: fine-tuning SD v1.4 and training from scratch"]
    finetune = [f for f in sd if "--from_scratch" not in f]
    scratch = [f for f in sd if "--from_scratch" in f]
    assert {f["--max_train_steps"][0] for f in finetune} == {"5000"}
    assert {f["--learning_rate"][0] for f in finetune} == {"1e-5"}
    assert {f["--max_train_steps"][0] for f in scratch} == {"20000"}
    assert {f["--gradient_accumulation_steps"][0] for f in scratch} == {"4"}  # 4 x 128 x 4 = 2048


def test_every_training_command_parses_with_its_real_flags(tmp_path, monkeypatch, tiny_sd):
    """Before anything is replaced: the trainers accept the page's flags as written (parse only). Parsing checks
    that folders exist, so the CelebA folder is made here (empty) and SD's model, which parsing looks up on the
    Hub (offline here), is the tiny one."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "img_align_celeba").mkdir()
    for commands in SECTIONS.values():
        for command in commands:
            if command[0] == "accelerate":
                script, argv = split_launch(command)
                assert script in TRAINERS
                if script == "train_immiscible_sd.py":
                    argv = replaced(argv, {"--pretrained_model_name_or_path": tiny_sd})
                args = load_script(REPO / script).parse_args(argv)
                assert args.max_train_steps >= 5000


def first_step_count(argv: list[str], flag: str) -> dict:
    """{flag: its first value} where `argv` gives the flag several sampler step counts, else {}."""
    values = dict((o[0], o[1:]) for o in options(argv)).get(flag, [])
    return {flag: values[0]} if len(values) > 1 else {}


def in_process_evaluate(argv):
    from immiscible_pipeline.evaluation import cli as evaluate

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        return evaluate.main(argv)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@pytest.mark.parametrize("title", list(SECTIONS))
@pytest.mark.slow
def test_each_command_runs_one_step_on_tiny_data_and_is_evaluated(title, tmp_path, monkeypatch, tiny_imagefolder,
                                                                  tiny_unet_config_path, tiny_sd, labelled_folder):
    monkeypatch.chdir(tmp_path)  # the page's relative output folders land here
    monkeypatch.setenv("IMMISCIBLE_CACHE", str(tmp_path / "cache"))
    stable_diffusion = title.startswith("Stable Diffusion")
    data = labelled_folder if stable_diffusion else tiny_imagefolder
    ran = {"train": 0, "evaluate": 0, "python": 0}
    for command in SECTIONS[title]:
        if command[0] == "accelerate":
            script, argv = split_launch(command)
            changes = {"--dataset_name": None, "--image_column": None, "--train_data_dir": data,
                       "--max_train_steps": 1, **first_step_count(argv, "--eval_inference_steps")}
            if stable_diffusion:
                changes.update({"--pretrained_model_name_or_path": tiny_sd, "--resolution": 16})
                if "fp16" in argv:
                    changes["--mixed_precision"] = "bf16"
            else:
                changes.update({"--model_config_name_or_path": tiny_unet_config_path, "--resolution": 8,
                                "--eval_num_samples": 2, "--eval_num_reference": 12})
            run_in_process(load_script(REPO / script), replaced(argv, changes))
            output = Path(dict((o[0], o[1:]) for o in options(argv))["--output_dir"][0])
            assert (output / "model_index.json").is_file(), command  # a saved diffusers pipeline
            if "--eval_steps" in argv:
                assert (output / "eval_history.jsonl").read_text().count('"fid"') >= 1
            ran["train"] += 1
        elif command[:3] == ["python", "-m", "immiscible_pipeline.evaluate"]:
            changes = {"--reference": data, "--reference_image_column": None, "--reference_split": None,
                       "--num_reference": 12, "--num_samples": 2,
                       **first_step_count(command[3:], "--num_inference_steps")}
            if "--samples_per_class" in command:
                changes["--samples_per_class"] = 1
            result = in_process_evaluate(replaced(command[3:], changes))
            model = dict((o[0], o[1:]) for o in options(command[3:]))["--model"][0]
            assert (Path(model) / "evaluation.json").is_file() and result is not None
            ran["evaluate"] += 1
        elif command[:2] == ["python", "-c"]:
            subprocess.run([sys.executable, *command[1:]], check=True, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
            ran["python"] += 1
        else:
            raise AssertionError(f"a command the test does not know how to run: {shlex.join(command)}")
    assert ran["train"] >= 2 and ran["evaluate"] == ran["train"]
    if stable_diffusion:
        assert (tmp_path / "imagenet_prompts.txt").read_text().splitlines() == ["a photo of a goldfish",
                                                                                "a photo of a tench"]
