"""Launch script: `python train/finetune.py RUN_DIR [--device cuda]` (DP-SGD fine-tuning of a
pretrained run). Argument wiring only; the work is in dpgen.pipeline.finetune_stage."""

import sys

from dpgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
