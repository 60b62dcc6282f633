"""Helpers for tests that start processes with `accelerate launch` (imported as `from launching import ...`).

Every launch runs in its own session (process group), so that a test can send Ctrl-C to the group as a
terminal does; a timeout kills the launcher and every process it started (a plain `subprocess.run` timeout
kills only the launcher, and the ranks it leaves running keep the output pipe open).
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent

# tqdm's counter once at least one step is done: "Steps:  25%|##5       | 1/4 [..."
STEP_DONE = re.compile(r"Steps:\s*\d+%\|[^|]*\|\s*[1-9]\d*/\d+ \[")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(processes: int, script, *args) -> list:
    """`accelerate launch` of `script` with `processes` CPU processes: several are MULTI_CPU with gloo, which
    takes --multi_gpu together with ACCELERATE_USE_CPU (see `launch_environment`)."""
    topology = ["--num_processes", "1"] if processes == 1 else [
        "--multi_gpu", "--num_processes", str(processes), "--main_process_port", str(free_port())]
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", *topology, str(script), *map(str, args)]


def launch_environment(**extra) -> dict:
    """Offline, on the CPU, this checkout first on the path, and one thread per process as `accelerate launch`
    sets it on a CPU: with more threads than free cores, OpenMP's waiting makes a tiny step ~30x slower on a
    busy machine."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # PYTHONFAULTHANDLER: a rank stopped by `_stop_hung` prints every thread's stack first.
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", ACCELERATE_USE_CPU="true",
                PYTHONPATH=path, PYTHONFAULTHANDLER="1", **{"OMP_NUM_THREADS": "1", **extra})


def _start(command, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            **kwargs)


def _signal_group(proc: subprocess.Popen, signum) -> None:
    """What a terminal does: the signal to the launcher's process group."""
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass


def _descendants(proc: subprocess.Popen) -> list:
    """Every process the launcher started (torchrun's ranks included), or none once it is gone."""
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _signal_each(processes, signum) -> None:
    for process in processes:
        try:
            process.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def _stop_hung(proc: subprocess.Popen) -> None:
    """Ends a launch that overran its time: first SIGABRT to every process it started (with PYTHONFAULTHANDLER
    set, each prints the Python stack of all its threads before it dies, so the output shows where every rank
    was waiting), then SIGKILL to the launcher's group and to every process it started (torchrun starts its
    ranks in sessions of their own, which the group does not reach)."""
    descendants = _descendants(proc)
    _signal_each(descendants, signal.SIGABRT)
    psutil.wait_procs(descendants, timeout=20)
    descendants = _descendants(proc)
    _signal_group(proc, signal.SIGKILL)
    _signal_each(descendants, signal.SIGKILL)


def run_launched(command, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Like `subprocess.run(command, capture_output=True, text=True, timeout=...)` (stderr is merged into
    stdout), but a timeout kills the whole process group before raising."""
    proc = _start(command, text=True, **kwargs)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_hung(proc)
        output, _ = proc.communicate(timeout=60)
        raise AssertionError(f"{command} timed out after {timeout} s:\n{output[-12000:]}") from None
    return subprocess.CompletedProcess(command, proc.returncode, output, "")


def interrupt_after_first_step(command, timeout: float, signum=signal.SIGINT, **kwargs) -> subprocess.CompletedProcess:
    """Runs `command` and sends `signum` to its process group (Ctrl-C by default) as soon as its progress
    bar shows a finished step; returns the completed process with its merged output."""
    proc = _start(command, **kwargs)
    chunks, sent = [], threading.Event()

    def read():
        for chunk in iter(lambda: os.read(proc.stdout.fileno(), 4096), b""):
            chunks.append(chunk)
            if not sent.is_set() and STEP_DONE.search(b"".join(chunks).decode(errors="replace")):
                _signal_group(proc, signum)
                sent.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    # The output ends when every process of the group has closed it: the launcher can exit on Ctrl-C before
    # the training process has finished saving.
    reader.join(timeout=timeout)
    if reader.is_alive():
        _stop_hung(proc)
        reader.join(timeout=60)
    proc.wait(timeout=60)
    output = b"".join(chunks).decode(errors="replace")
    assert sent.is_set(), f"{command} never finished a step:\n{output[-4000:]}"
    return subprocess.CompletedProcess(command, proc.returncode, output, "")
