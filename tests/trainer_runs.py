"""Running the trainer scripts in tests (imported as `from trainer_runs import ...`): launched or in this
process, spying on their noise assignment, and reading what a run left in its output folder."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from accelerate.state import AcceleratorState, GradientState

from launching import launch_command, launch_environment, run_launched


def load_script(path):
    """A trainer script as a module (its `parse_args`, `main` and imported names, for monkeypatching)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_in_process(trainer, argv):
    """`main()` in this process, on a clean Accelerate state (it is process-wide)."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        trainer.main(trainer.parse_args(argv))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def spy_on_noise(trainer, monkeypatch, interrupt_on_call=()) -> list:
    """Wraps the script's noise assignment: returns the list of the batches it is called with, and sends this
    process a SIGINT during the calls numbered in `interrupt_on_call` (a set the test may change)."""
    builder = builder_module(trainer)
    calls, real_build = [], builder.build_immiscible

    def spying_build(*args, **kwargs):
        imm = real_build(*args, **kwargs)

        class Spy:
            last_stats = property(lambda self: imm.last_stats)

            def __call__(self, x0, **kw):
                calls.append(x0.clone())
                if len(calls) in interrupt_on_call:
                    os.kill(os.getpid(), signal.SIGINT)
                return imm(x0, **kw)
        return Spy()

    monkeypatch.setattr(builder, "build_immiscible", spying_build)
    return calls


def builder_module(trainer):
    """Where a trainer's `build_immiscible` is looked up: the script, or the pixel trainers' skeleton it uses."""
    if hasattr(trainer, "build_immiscible"):
        return trainer
    from immiscible_pipeline.training import pixel_run

    return pixel_run


def launch(script, argv, processes: int = 1) -> subprocess.CompletedProcess:
    """`accelerate launch` of a trainer with `processes` CPU processes; fails the test with its output if it fails."""
    # Below pytest's 600 s, so that a hang fails with every rank's stack and output in the report.
    result = run_launched(launch_command(processes, script, *argv), env=launch_environment(), timeout=420)
    assert result.returncode == 0, f"launch failed:\n{result.stdout[-6000:]}"
    return result


def scalars(output_dir, project: str) -> dict:
    """The last value of every scalar a run logged to TensorBoard under `project`, and its image tags."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = (Path(output_dir) / "logs" / project).glob("events.out.tfevents.*")
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    values = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    values["images"] = sorted(events.Tags()["images"])
    return values


def summary(output_dir) -> dict:
    """The run's training_config.json."""
    return json.loads((Path(output_dir) / "training_config.json").read_text())


def checkpoints(output_dir) -> list:
    """The names of the checkpoint folders in `output_dir`, sorted."""
    return sorted(path.name for path in Path(output_dir).glob("checkpoint-*"))


def run_with_warnings(trainer, argv) -> str:
    """`run_in_process` (arguments made strings); returns the warnings the run logged, one per line."""
    import logging

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        run_in_process(trainer, [str(arg) for arg in argv])
    finally:
        logging.getLogger().removeHandler(handler)
    return "\n".join(records)


def refused_flags(trainer, flags: dict, base_argv) -> set:
    """Parses `base_argv(flag) + [flag, value]` for each diffusers flag in `flags` ({flag: value, None for a
    switch}); returns those refused with a ValueError. An error that does not name its flag, or argparse's own
    "unrecognized arguments", fails the test."""
    import pytest

    refused = set()
    for flag, value in flags.items():
        argv = [str(arg) for arg in base_argv(flag)] + [flag] + ([] if value is None else [str(value)])
        try:
            trainer.parse_args(argv)
        except ValueError as error:
            assert flag in str(error), f"{flag}: the error does not name the flag: {error}"
            refused.add(flag)
        except SystemExit:
            pytest.fail(f"{' '.join(argv)}: argparse refused it")
    return refused
