"""How long does evaluating a 10,000-image 28x28 cohort take on this machine?

    DPGEN_DATA_DIR=../shared/data python benchmarks/eval_speed.py [--n 10000] [--utility] [--threads N]

Builds a throwaway run directory (BreastMNIST as the private data, PneumoniaMNIST as the public
data) whose cohort is N real 28x28 images (PneumoniaMNIST and flipped BreastMNIST images; their
content does not matter for speed), then times `evaluate_stage`:
  1. the first call, which also trains the public encoder once (cached in the run directory);
  2. a second call with the cached encoder: feature extraction (cohort, private train, private test)
     + every fidelity metric overall and per class, with its real-vs-real reference. This is the
     figure the issue asks for.
With --utility it also times the four classifier rows (3 seeds, default recipe).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="cohort size (default 10000)")
    ap.add_argument("--utility", action="store_true", help="also time the four utility rows")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["DPGEN_DATA_DIR"] = os.environ.get("DPGEN_DATA_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "data")

    from dpgen.config import config_from_dict
    from dpgen.data import load_npz, resolve_source
    from dpgen.data.cohort import write_cohort_npz
    from dpgen.evaluation import EvalOptions, evaluate_stage, format_summary
    from dpgen.rundir import RunDir

    config = config_from_dict({
        "name": "eval-speed",
        "data": {"public": {"source": "pneumoniamnist"}, "private": {"source": "breastmnist"}, "num_classes": 2,
                 "class_names": ["malignant", "normal_benign"]},
    })
    pneu, breast = resolve_source("pneumoniamnist"), resolve_source("breastmnist")
    pool_x, pool_y = [], []
    for split in ("train", "val", "test"):
        ds = load_npz(pneu, split)
        pool_x.append(ds.images)
        pool_y.append(ds.labels)
    tr = load_npz(breast, "train")
    pool_x += [tr.images[..., ::-1], tr.images[..., ::-1, :]]
    pool_y += [tr.labels, tr.labels]
    pool_x, pool_y = np.concatenate(pool_x), np.concatenate(pool_y)
    idx = np.random.default_rng(0).choice(len(pool_x), args.n, replace=len(pool_x) < args.n)
    images, labels = np.ascontiguousarray(pool_x[idx]), pool_y[idx]

    with tempfile.TemporaryDirectory(prefix="dpgen-eval-speed-") as tmp:
        rd = RunDir.create(Path(tmp) / "run", config)
        write_cohort_npz(rd.cohort / "cohort.npz", images, labels)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"cohort: {args.n} images of 28x28, torch threads {torch.get_num_threads()}, "
              f"CPUs {os.cpu_count()}, load average {load:.2f}", flush=True)

        t = time.perf_counter()
        first = evaluate_stage(config, rd, device="cpu", progress=False, options=EvalOptions(utility=False))
        t_first = time.perf_counter() - t
        t = time.perf_counter()
        second = evaluate_stage(config, rd, device="cpu", progress=False, options=EvalOptions(utility=False))
        t_second = time.perf_counter() - t
        tm = second["timing"]
        print(f"first call (trains + caches the public encoder): {t_first:.1f} s "
              f"(encoder {first['timing']['feature_extractor_s']:.1f} s)")
        print(f"evaluate fidelity of a {args.n}-image cohort with the cached encoder: {t_second:.1f} s "
              f"(features {tm['features_s']:.1f} s for {args.n + second['real_data']['n_train'] + second['real_data']['n_test']} "
              f"images, metrics {tm['fidelity_metrics_s']:.1f} s)")
        if args.utility:
            t = time.perf_counter()
            full = evaluate_stage(config, rd, device="cpu", progress=False, options=EvalOptions())
            print(f"with the four utility rows (3 seeds): {time.perf_counter() - t:.1f} s "
                  f"(classifier training {full['timing']['utility_training_s']:.1f} s)")
            print(format_summary(full))
    return 0


if __name__ == "__main__":
    sys.exit(main())
