"""How long do the memorization statistics take for 10^4 synthetic x 10^4 training images?

    python benchmarks/probe_speed.py [--n 10000] [--m 10000] [--side 28] [--threads N] [--chunk 1024]

Times `dpgen.probes.memorization.nearest_neighbours` (the whole per-pair work of the probe: l2
distances through one Gram matrix per chunk, the k = 50 nearest, the Carlini ratio, the maximum
Pearson correlation from the same Gram matrix, the exact nearest distance) on N x M random
uint8 images, and the same in a 64-dimensional feature space. Random pixels cost the same as
real ones. Prints seconds and pairs per second; nothing is written.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="query (synthetic) images (default 10000)")
    ap.add_argument("--m", type=int, default=10_000, help="training images (default 10000)")
    ap.add_argument("--side", type=int, default=28, help="image side (default 28)")
    ap.add_argument("--feature-dim", type=int, default=64, help="feature-space dimension (default 64)")
    ap.add_argument("--chunk", type=int, default=1024, help="queries per chunk (default 1024)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats; the best is reported (default 2)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from dpgen.probes.memorization import flat_unit_range, nearest_neighbours

    rng = np.random.default_rng(0)
    syn = rng.integers(0, 256, (args.n, 1, args.side, args.side), dtype=np.uint8)
    train = rng.integers(0, 256, (args.m, 1, args.side, args.side), dtype=np.uint8)
    q, t = flat_unit_range(syn), flat_unit_range(train)
    fq = torch.randn(args.n, args.feature_dim)
    ft = torch.randn(args.m, args.feature_dim)
    pairs = args.n * args.m
    print(f"{args.n} x {args.m} pairs of {args.side}x{args.side} images, torch threads {torch.get_num_threads()}, "
          f"chunk {args.chunk}")
    for label, a, b, corr in (("pixel space (distances, k=50, ratio, max correlation)", q, t, True),
                              (f"feature space ({args.feature_dim}-d: distances, k=50, ratio)", fq, ft, False)):
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            nearest_neighbours(a, b, correlation=corr, chunk=args.chunk)
            best = min(best, time.perf_counter() - t0)
        print(f"  {label}: {best:.2f} s ({pairs / best / 1e6:.1f} M pairs/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
