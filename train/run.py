"""Launch script: `python train/run.py CONFIG [key=value ...] [--run-dir DIR] [--resume]`
or `accelerate launch train/run.py ...`. Argument wiring only; the work is in dpgen.pipeline."""

import sys

from dpgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
