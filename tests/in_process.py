"""Running a trainer script's `main()` inside the test process (imported as `from in_process import ...`):
seconds cheaper than an `accelerate launch` per run, and monkeypatch reaches the script's globals."""

import importlib.util
from pathlib import Path

from accelerate.state import AcceleratorState, GradientState

REPO = Path(__file__).resolve().parent.parent


def load_script(path):
    """A trainer script (e.g. REPO / "train_immiscible_sd.py") as a module: its `parse_args`, `main` and imported
    names, for monkeypatching."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_in_process(script, argv) -> None:
    """`script.main(script.parse_args(argv))` on a clean Accelerate state (it is process-wide)."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        script.main(script.parse_args([str(arg) for arg in argv]))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
