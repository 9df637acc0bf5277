"""Launch script: can the fidelity metrics of a run fail? `python evaluate/sanity.py RUN_DIR`

Evaluates three stand-in cohorts against the run's real data with the run's feature extractor,
without touching the run's metrics (nothing is written except the cached public encoder):
- real private val images (held-out real data: should score near the real-vs-real reference),
- real private test images (the reference set itself: reproduces the reference exactly),
- uniform noise with the cohort's class counts (should score far worse on every metric).
Prints FD/KID/precision/recall/density/coverage of each beside the reference.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fidelity sanity check: real held-out images vs noise")
    ap.add_argument("run_dir")
    ap.add_argument("--feature-extractor", choices=("public-encoder", "inception"), default="public-encoder")
    ap.add_argument("--inception-weights", default=None)
    args = ap.parse_args(argv)

    from dpgen.data.cohort import write_cohort_npz
    from dpgen.evaluation import EvalOptions, evaluate_stage
    from dpgen.evaluation.inputs import load_real
    from dpgen.rundir import RunDir

    rd = RunDir(args.run_dir)
    config = rd.load_config()
    spec = config.data.private
    val = load_real(spec, "val")
    test = load_real(spec, "test")
    rng = np.random.default_rng(0)
    cohorts = {
        "real private val": (val.images, val.labels),
        "real private test": (test.images, test.labels),
        "noise": (rng.integers(0, 256, size=test.images.shape, dtype=np.uint8), test.labels),
    }
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name, (x, y) in cohorts.items():
            path = write_cohort_npz(Path(tmp) / f"{name.replace(' ', '_')}.npz", x, y)
            results[name] = evaluate_stage(config, rd, progress=False, cohort_path=path, write=False,
                                           feature_extractor=args.feature_extractor,
                                           inception_weights=args.inception_weights,
                                           options=EvalOptions(utility=False))["fidelity"]["overall"]
    first = next(iter(results.values()))
    print(f"{'metric':<28}{'real vs real':>16}" + "".join(f"{n:>20}" for n in results))
    for m in first["metrics"]:
        ref = first["metrics"][m]["real_vs_real"]
        row = "".join(f"{r['metrics'][m]['cohort']:>20.4g}" for r in results.values())
        print(f"{m:<28}{ref:>16.4g}{row}")
    print("(each cohort and the reference are compared at the same n; 'real vs real' shown for the first cohort's n)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
