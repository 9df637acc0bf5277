"""Fidelity metrics on features: Frechet distance, KID, precision / recall / density / coverage.

- Frechet distance and KID come from torchmetrics (`FrechetInceptionDistance`,
  `KernelInceptionDistance`), fed with precomputed features through a pass-through module, so
  any extractor (public encoder, Inception, a user module) shares one code path.
- Precision, recall, density and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity
  Metrics for Generative Models") are not in torchmetrics; `prdc` implements them in chunks of
  pairwise distances (memory O(chunk x N), never N x N), following the reference code
  (clovaai/generative-evaluation-prdc): k-NN radii exclude the point itself, and "inside a ball"
  is a strict `<`.

Every number is reported beside a real-vs-real reference computed the same way at the same
sample size (see `compare_to_reference`): these metrics are biased by sample size (FD, coverage
and recall all move with n), so a cohort of 10,000 compared with a reference of 156 would
mislead. The cohort is subsampled to the reference's size (several draws, mean and spread);
the full-cohort value is kept too.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

METRICS = ("FD", "KID", "precision", "recall", "density", "coverage", "diversity")
BETTER = {"FD": "lower", "KID": "lower", "precision": "higher", "recall": "higher", "density": "higher (1 = real-like)",
          "coverage": "higher", "diversity": "higher (1 = real-like)"}
DEFAULT_K = 5


class _Passthrough(nn.Module):
    """Lets torchmetrics' image metrics take features that are already computed."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _as_features(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).double()
    if t.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(t.shape)}")
    return t


def frechet_distance(real, fake) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (torchmetrics' FID maths)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _as_features(real), _as_features(fake)
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"Frechet distance needs at least 2 samples per set (got {len(real)} real, {len(fake)} fake)")
    metric = FrechetInceptionDistance(feature=_Passthrough(real.shape[1]))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return max(float(metric.compute()), 0.0)  # tiny negative values are rounding


def kernel_distance(real, fake, subsets: int = 50, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (unbiased polynomial-kernel MMD^2), mean and std over random subsets (torchmetrics)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _as_features(real), _as_features(fake)
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set (got {len(real)} real, {len(fake)} fake)")
    if m >= len(real) and m >= len(fake):
        subsets = 1  # every subset is the whole of both sets: one is enough
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "will save all extracted features in buffer"
        metric = KernelInceptionDistance(feature=_Passthrough(real.shape[1]), subsets=subsets, subset_size=m)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (float64, via the Gram trick; clamped at 0)."""
    d2 = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None, :]
    return d2.clamp_min_(0).sqrt_()


def knn_radii(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour in the same set (itself excluded)."""
    if len(x) <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} samples, got {len(x)}")
    out = []
    for s in range(0, len(x), chunk):
        d = _dists(x[s:s + chunk], x)
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(out)


def prdc(real, fake, k: int = DEFAULT_K, chunk: int = 1024) -> dict[str, float]:
    """Precision, recall, density and coverage of `fake` w.r.t. `real` (Naeem et al. 2020)."""
    real, fake = _as_features(real), _as_features(fake)
    r_radii = knn_radii(real, k, chunk)
    f_radii = knn_radii(fake, k, chunk)
    precise = 0
    inside = 0.0
    recalled = torch.zeros(len(real), dtype=torch.bool)
    nearest = torch.full((len(real),), float("inf"), dtype=torch.float64)
    for s in range(0, len(fake), chunk):
        d = _dists(fake[s:s + chunk], real)  # (m, N)
        in_real_ball = d < r_radii[None, :]
        precise += int(in_real_ball.any(1).sum())
        inside += float(in_real_ball.sum())
        recalled |= (d < f_radii[s:s + chunk, None]).any(0)
        nearest = torch.minimum(nearest, d.min(0).values)
    return {
        "precision": precise / len(fake),
        "recall": float(recalled.double().mean()),
        "density": inside / (k * len(fake)),
        "coverage": float((nearest < r_radii).double().mean()),
    }


def mean_pairwise_distance(x, max_rows: int = 2000, seed: int = 0) -> float:
    """Mean Euclidean distance between two different rows of `x` (a random subset of `max_rows`
    rows when larger): how spread out a set of features is."""
    x = _as_features(x)
    if len(x) > max_rows:
        x = x[torch.as_tensor(np.random.default_rng(seed).choice(len(x), max_rows, replace=False))]
    n = len(x)
    if n < 2:
        return float("nan")
    return float(_dists(x, x).sum() / (n * (n - 1)))


def fidelity_metrics(real, fake, k: int = DEFAULT_K, kid_subsets: int = 50, kid_subset_size: int = 1000,
                     seed: int = 0) -> dict[str, float]:
    """All metrics of one (real, fake) pair of feature sets."""
    real, fake = _as_features(real), _as_features(fake)
    out: dict = {m: None for m in METRICS}
    out["KID_subset_std"] = None
    if min(len(real), len(fake)) >= 2:  # FD and KID are undefined for a single sample
        out["FD"] = frechet_distance(real, fake)
        out["KID"], out["KID_subset_std"] = kernel_distance(real, fake, kid_subsets, kid_subset_size, seed)
    if len(real) > k and len(fake) > k:  # k-NN radii need k neighbours
        out.update(prdc(real, fake, k))
    if min(len(real), len(fake)) >= 2:
        # Diversity: the spread of `fake` over that of `real` (1 = as varied as the real images;
        # a mode-collapsed cohort is near 0 even when its few modes are precise).
        out["diversity"] = mean_pairwise_distance(fake, seed=seed) / mean_pairwise_distance(real, seed=seed)
    return out


def _summarise(runs: list[dict]) -> dict[str, tuple[float | None, float | None]]:
    out = {}
    for m in METRICS:
        vals = [r[m] for r in runs if r.get(m) is not None]
        out[m] = (float(np.mean(vals)), float(np.std(vals))) if vals else (None, None)
    return out


def _draws(x: torch.Tensor, n: int, repeats: int, rng: np.random.Generator) -> list[torch.Tensor]:
    if len(x) <= n:
        return [x]
    return [x[torch.as_tensor(np.sort(rng.choice(len(x), n, replace=False)))] for _ in range(repeats)]


def compare_to_reference(real, cohort, reference, repeats: int = 5, k: int = DEFAULT_K, seed: int = 0,
                         kid_subsets: int = 50) -> dict:
    """Cohort vs real, beside held-out real vs real, at one matched sample size.

    `real`: the features the cohort should resemble (private train); `reference`: other real
    images of the same distribution (private test). n = min(|cohort|, |reference|); whichever set
    is larger is subsampled to n (`repeats` draws: mean and std over draws). Returns per metric
    {"cohort", "cohort_std", "real_vs_real", "real_vs_real_std", "cohort_full", "better"}.
    """
    real, cohort, reference = _as_features(real), _as_features(cohort), _as_features(reference)
    n = min(len(cohort), len(reference))
    rng = np.random.default_rng(seed)
    kw = {"k": k, "kid_subsets": kid_subsets, "seed": seed}
    c_runs = [fidelity_metrics(real, c, **kw) for c in _draws(cohort, n, repeats, rng)]
    r_runs = [fidelity_metrics(real, r, **kw) for r in _draws(reference, n, repeats, rng)]
    full = c_runs[0] if len(cohort) == n else fidelity_metrics(real, cohort, **kw)
    c_sum, r_sum = _summarise(c_runs), _summarise(r_runs)
    table = {}
    for m in METRICS:
        table[m] = {
            "cohort": c_sum[m][0], "cohort_std": c_sum[m][1],
            "real_vs_real": r_sum[m][0], "real_vs_real_std": r_sum[m][1],
            "cohort_full": full.get(m), "better": BETTER[m],
        }
    return {"n_matched": n, "n_real": len(real), "n_cohort": len(cohort), "n_reference": len(reference),
            "draws": {"cohort": len(c_runs), "reference": len(r_runs)}, "metrics": table}


__all__ = ["METRICS", "BETTER", "frechet_distance", "mean_pairwise_distance", "kernel_distance", "prdc", "knn_radii", "fidelity_metrics",
           "compare_to_reference"]
