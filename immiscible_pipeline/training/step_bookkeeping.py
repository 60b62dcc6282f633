"""The bookkeeping after each micro-batch that every trainer shares, so that their loops differ only in how
the loss is made (see `TrainingProgress`)."""

from __future__ import annotations

import torch

from .checkpoints import save_checkpoint
from .interruption import StopOnSignal


def step_logs(loss: float, lr_scheduler, immiscible, ema=None) -> dict:
    """What a trainer logs after each optimisation step: loss, learning rate, the assignment's statistics of
    the last micro-batch and the EMA decay."""
    logs = {"loss": loss, "lr": lr_scheduler.get_last_lr()[0], **immiscible.last_stats.as_dict()}
    if ema is not None:
        logs["ema_decay"] = ema.cur_decay_value
    return logs


class TrainingProgress:
    """The bookkeeping every trainer does after its micro-batch, so that the scripts' loops differ only in how
    the loss is made: the loss summed over gradient accumulation, then at each optimisation step the EMA step,
    the step counter, the logs and progress bar, a checkpoint every --checkpointing_steps or when Ctrl-C /
    SIGTERM arrives (on every process together), and when to stop.

        progress = TrainingProgress(accelerator, args, lr_scheduler, max_train_steps, global_step, immiscible, ema)
        for batch in batches:
            ...forward, backward, optimizer step...
            if progress.after_micro_batch(loss, model.parameters()):
                ...validation at progress.global_step...
            if progress.stopping:
                break
        progress.close()   # after an interruption: trackers closed, exit status 130

    `after_micro_batch` returns True after an optimisation step that ran to completion (not one cut short by
    a signal): the moment for validation and evaluation. Call it on every process (it is a collective)."""

    def __init__(self, accelerator, args, lr_scheduler, max_train_steps: int, global_step: int, immiscible,
                 ema=None):
        from tqdm.auto import tqdm

        self.accelerator, self.args, self.lr_scheduler = accelerator, args, lr_scheduler
        self.immiscible, self.ema = immiscible, ema
        self.max_train_steps, self.global_step = max_train_steps, global_step
        self.train_loss, self.interrupted = 0.0, False
        self.bar = tqdm(range(max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
        self.stop = StopOnSignal(accelerator)

    @property
    def finished(self) -> bool:
        return self.global_step >= self.max_train_steps

    @property
    def stopping(self) -> bool:
        """True once the loop should end: the last step is done, or a signal asked to stop (checkpoint saved)."""
        return self.interrupted or self.finished

    def after_micro_batch(self, loss: torch.Tensor, parameters) -> bool:
        """All of the below in one call (the latent trainers' loops): the loss, and at the end of an optimisation
        step the EMA step, `end_step` and `checkpoint_if_due`."""
        self.add_loss(loss)
        if not self.accelerator.sync_gradients:
            return False
        if self.ema is not None:
            self.ema.step(parameters)
        self.end_step()
        return self.checkpoint_if_due()

    def add_loss(self, loss: torch.Tensor) -> None:
        """Adds a micro-batch's loss (averaged over processes) to the step's, for the logs. A collective."""
        self.train_loss += self.accelerator.reduce(loss.detach(), "mean").item() / self.args.gradient_accumulation_steps

    def end_step(self) -> None:
        """After an optimisation step (and its EMA step): the step count, the logs and the progress bar."""
        self.global_step += 1
        self.bar.update(1)
        logs = step_logs(self.train_loss, self.lr_scheduler, self.immiscible, self.ema)
        self.accelerator.log(logs, step=self.global_step)
        self.bar.set_postfix(loss=self.train_loss, lr=logs["lr"])
        self.train_loss = 0.0

    def checkpoint_if_due(self) -> bool:
        """A checkpoint every --checkpointing_steps, or at once when Ctrl-C / SIGTERM reached any process (every
        process then saves this step's checkpoint and the loop ends; at the last step the run just finishes).
        Returns False after such an interruption. A collective: call it on every process."""
        self.interrupted = self.stop.requested() and not self.finished
        if self.global_step % self.args.checkpointing_steps == 0 or self.interrupted:
            save_checkpoint(self.accelerator, self.args.output_dir, self.global_step, self.args.checkpoints_total_limit)
        return not self.interrupted

    def close(self) -> None:
        """Closes the bar and puts the signal handlers back; after an interruption, ends the process (130)."""
        self.bar.close()
        if self.interrupted:
            self.stop.exit(self.global_step, self.args.output_dir)  # its checkpoint is saved; no pipeline
        self.stop.restore()
