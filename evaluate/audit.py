"""Launch script: `python evaluate/audit.py RUN_DIR [options]` == `dpgen audit RUN_DIR [options]`.

Argument wiring only; the work is `dpgen.probes.audit_stage`. Examples:

    python evaluate/audit.py runs/quickstart                       # all probes, summary on stdout
    python evaluate/audit.py runs/quickstart --json > probes.json  # the aggregate results as JSON
    python evaluate/audit.py runs/quickstart --no-overfit-control --attack-targets 2   # quicker

Per-image results and figures (they show private images) go to RUN/internal/audit/; the
releasable aggregate summary to RUN/metrics/probes_summary.json.
"""

import sys

from dpgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["audit", *sys.argv[1:]]))
