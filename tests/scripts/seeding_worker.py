"""Run by tests/test_seeding.py under `accelerate launch` (2 CPU processes, gloo): train_immiscible_ddim.py's
main() with every process's generators started from the same state, as CUDA's default generators are.

    seeding_worker.py OUT_FILE_PREFIX TRAINER_ARGS...

Saves the noise of every assignment call (and the run's seed) to OUT_FILE_PREFIX<rank>.pt.
"""

import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for trainer_runs
from trainer_runs import builder_module, load_script  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "train_immiscible_ddim.py"


def main(prefix, argv):
    trainer = load_script(SCRIPT)
    builder = builder_module(trainer)
    noises, real_build = [], builder.build_immiscible

    def recording_build(*args, **kwargs):
        imm = real_build(*args, **kwargs)

        class Recorder:
            last_stats = property(lambda self: imm.last_stats)

            def __call__(self, x0, **kw):
                noises.append(imm(x0, **kw))
                return noises[-1]
        return Recorder()

    builder.build_immiscible = recording_build
    # What every CUDA process has at start: the same default generator state (here on purpose, on the CPU).
    torch.manual_seed(1234), random.seed(1234), np.random.seed(1234)
    args = trainer.parse_args(argv)
    trainer.main(args)
    torch.save({"noises": noises, "seed": args.seed}, f"{prefix}{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
