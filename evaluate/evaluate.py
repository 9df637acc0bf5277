"""Launch script: `python evaluate/evaluate.py RUN_DIR [options]` == `dpgen evaluate RUN_DIR [options]`.

Argument wiring only; the work is `dpgen.evaluation.evaluate_stage`. Examples:

    python evaluate/evaluate.py runs/quickstart                    # fidelity + the four utility rows
    python evaluate/evaluate.py runs/quickstart --json > metrics.json
    python evaluate/evaluate.py runs/quickstart --no-utility       # fidelity only (fast)
    python evaluate/evaluate.py runs/quickstart --feature-extractor inception \\
        --inception-weights ~/weights/pt_inception-2015-12-05-6726825d.pth   # needs dpgen[inception]
"""

import sys

from dpgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
