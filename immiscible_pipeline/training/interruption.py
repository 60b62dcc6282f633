"""Ctrl-C and SIGTERM as a request to stop at the next step with a checkpoint, on every process together."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from .accelerator_setup import end_training

logger = logging.getLogger(__name__)


class StopOnSignal:
    """Turns Ctrl-C (SIGINT) and SIGTERM (a cluster's pre-emption, torchrun's shutdown) into a request to stop
    at the next step boundary, so that the loop can save a checkpoint and leave instead of dying mid-step:

        stop = StopOnSignal(accelerator)
        for batch in loader:
            ...one optimisation step...
            if stop.requested():      # on every process at once: the flag is reduced across processes
                save_checkpoint(...)
                break
        stop.restore()

    A second Ctrl-C at least `patience` seconds after the first stops at once (KeyboardInterrupt); repeated
    SIGTERMs and quick repeats are ignored, as a scheduler may send SIGTERM to every process and torchrun then
    passes it on once more. Under torchrun the ranks run in sessions of their own: a terminal's Ctrl-C reaches
    them through the agent. Handlers can only be set from the main thread; elsewhere the object does nothing
    and `requested()` only reports other processes' requests.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, accelerator, patience: float = 2.0):
        self.accelerator, self.patience = accelerator, patience
        self.first_signal, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        # Only notes the request: the collective flag is set by `requested()`, outside the handler.
        if self.first_signal is None:
            self.first_signal = time.monotonic()
            logger.warning("%s received: stopping after this step with a checkpoint (Ctrl-C again to stop at "
                           "once)", signal.Signals(signum).name)
        elif signum == signal.SIGINT and time.monotonic() - self.first_signal >= self.patience:
            self.restore()
            raise KeyboardInterrupt

    def requested(self) -> bool:
        """True on every process once any of them received a signal (a collective: call it on all)."""
        if self.first_signal is not None:
            self.accelerator.set_trigger()
        return self.accelerator.check_trigger()

    def restore(self) -> None:
        """Puts the previous handlers back."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def exit(self, step: int, output_dir: str | os.PathLike) -> None:
        """Ends the run after the checkpoint of `step` was saved: trackers closed, exit status 130 (as Ctrl-C)."""
        self.restore()
        logger.warning("Interrupted at step %d: its checkpoint is in %s; continue with --resume_from_checkpoint "
                       "latest", step, output_dir)
        end_training(self.accelerator)
        sys.exit(130)
