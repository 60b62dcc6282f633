"""Running a trainer script's `main()` in this process, and spying on its noise assignment
(imported as `from trainer_spies import ...`)."""

import importlib.util
import os
import signal

from accelerate.state import AcceleratorState, GradientState


def load_script(path):
    """A trainer script as a module (its `parse_args`, `main` and imported names, for monkeypatching)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
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
    calls, real_build = [], trainer.build_immiscible

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

    monkeypatch.setattr(trainer, "build_immiscible", spying_build)
    return calls
