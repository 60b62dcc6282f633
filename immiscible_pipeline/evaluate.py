"""`python -m immiscible_pipeline.evaluate`: the evaluation command line (see `evaluation/cli.py`)."""

import sys

from .evaluation.cli import main, parse_args  # noqa: F401  (parse_args: for tools that read the flags)
from .training.accelerator_setup import end_training

if __name__ == "__main__":
    main(sys.argv[1:])
    end_training()  # with several processes: the process group is released before exit
