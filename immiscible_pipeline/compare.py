"""`python -m immiscible_pipeline.compare RUN_DIR...`: the speed-up at equal FID of immiscible runs against vanilla
ones (see `evaluation/compare_cli.py`)."""

import sys

from .evaluation.compare_cli import main, parse_args  # noqa: F401  (parse_args: for tools that read the flags)

if __name__ == "__main__":
    main(sys.argv[1:])
