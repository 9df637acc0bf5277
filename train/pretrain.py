"""Launch script: `python train/pretrain.py CONFIG --run-dir DIR` (public pretraining).
Argument wiring only; the work is in dpgen.pipeline.pretrain_stage."""

import sys

from dpgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
