"""Attack statistics: ROC-AUC, TPR at low FPR, bootstrap intervals, and what DP allows.

Conventions: a higher score means "more likely a member". For a threshold t,
FPR(t) = P[non-member score > t] and TPR(t) = P[member score > t]. TPR at FPR alpha is the
largest TPR over thresholds with FPR <= alpha; with n non-members the smallest non-zero FPR
is 1/n, so for alpha < 1/n it is the TPR at FPR 0 (members scoring above every non-member).
The result says how many non-members it rests on, so nobody reads "TPR at 0.1% FPR" from 78
non-members as more than it is.

Bootstrap intervals resample members and non-members independently (percentile intervals,
`n_boot` resamples at once as index matrices: no Python loop over resamples).

DP limits (the hypothesis-testing view of DP, Kairouz et al. 2015; Dong, Roth & Su 2019): for
any test of "record in" vs "record out" on an (epsilon, delta)-DP mechanism,
    TPR <= min(1, e^eps * FPR + delta, 1 - e^-eps * (1 - delta - FPR)).
Tighter is the trade-off curve f of the mechanism actually run: TPR <= 1 - f(FPR). For
DP-SGD (Poisson-subsampled Gaussian, sigma, q, T steps), 1 - f(alpha) = inf_eps' [e^eps' alpha +
delta(eps')] on the exact privacy-loss distribution, which is exactly the reconstruction-
robustness quantity `dpgen.privacy.bounds.rero_bound_tight(sigma, q, T, kappa=alpha)` computes
(certified, pessimistic PLD); `dp_tpr_limits` reuses it. A population-level ROC of an attack
that scores many records is an average of per-record tests, and 1 - f is concave, so the same
limits apply to it.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata

from dpgen.privacy.bounds import eps_delta_auc_limit, eps_delta_tpr_limit  # noqa: F401  (one home: privacy/bounds)

FPRS = (0.01, 0.001)


def auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """ROC-AUC = P[member score > non-member score] + 0.5 P[tie] (Mann-Whitney)."""
    return float(_auc_rows(np.asarray(members, float)[None], np.asarray(non_members, float)[None])[0])


def _auc_rows(m: np.ndarray, n: np.ndarray) -> np.ndarray:
    """AUC of each row of (B, n_m) member and (B, n_n) non-member scores, ties averaged."""
    nm, nn = m.shape[1], n.shape[1]
    ranks = rankdata(np.concatenate([m, n], axis=1), axis=1)
    return (ranks[:, :nm].sum(1) - nm * (nm + 1) / 2) / (nm * nn)


def _tpr_rows(m: np.ndarray, n: np.ndarray, fpr: float) -> np.ndarray:
    """Largest TPR with FPR <= fpr, per row: threshold = the (k+1)-th largest non-member
    score, k = floor(fpr * n_n), so at most k non-members lie strictly above it."""
    k = int(math.floor(fpr * n.shape[1] + 1e-12))
    thr = -np.sort(-n, axis=1)[:, k]
    return (m > thr[:, None]).mean(1)


def tpr_at_fpr(members: np.ndarray, non_members: np.ndarray, fpr: float) -> float:
    return float(_tpr_rows(np.asarray(members, float)[None], np.asarray(non_members, float)[None], fpr)[0])


def roc_curve(members: np.ndarray, non_members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1)."""
    m, n = np.asarray(members, float), np.asarray(non_members, float)
    thr = np.unique(np.concatenate([m, n]))[::-1]
    fpr = np.concatenate([[0.0], (n[None] >= thr[:, None]).mean(1)])
    tpr = np.concatenate([[0.0], (m[None] >= thr[:, None]).mean(1)])
    return fpr, tpr


def attack_metrics(members: np.ndarray, non_members: np.ndarray, fprs=FPRS, n_boot: int = 1000,
                   seed: int = 0, level: float = 0.95) -> dict:
    """AUC and TPR at each FPR, each with a percentile bootstrap interval."""
    m, n = np.asarray(members, float), np.asarray(non_members, float)
    rng = np.random.default_rng(seed)
    mb = m[rng.integers(0, len(m), (n_boot, len(m)))]
    nb = n[rng.integers(0, len(n), (n_boot, len(n)))]
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2

    def interval(samples: np.ndarray) -> list[float]:
        return [float(np.quantile(samples, lo_q)), float(np.quantile(samples, hi_q))]

    out = {
        "n_members": len(m), "n_non_members": len(n),
        "auc": auc(m, n), "auc_ci": interval(_auc_rows(mb, nb)),
        "tpr_at_fpr": {}, "bootstrap": {"resamples": n_boot, "level": level, "kind": "percentile, stratified"},
    }
    for f in fprs:
        out["tpr_at_fpr"][_fpr_key(f)] = {
            "fpr": f, "tpr": tpr_at_fpr(m, n, f), "ci": interval(_tpr_rows(mb, nb, f)),
            "resolution_note": None if f * len(n) >= 1 else
            f"{len(n)} non-members: the smallest non-zero FPR is {1 / len(n):.3g}, so this is the TPR at FPR 0",
        }
    return out


def _fpr_key(f: float) -> str:
    return f"{f * 100:g}%"


# ----------------------------------------------------------------------------- DP limits


def dp_tpr_limits(fprs=FPRS, epsilon: float | None = None, delta: float | None = None,
                  events: list[dict] | None = None, neighbouring: str = "add_remove") -> dict:
    """The largest TPR at each FPR that the run's privacy allows, two ways side by side.

    `eps_delta`: from the (epsilon, delta) statement alone. `mechanism_pld`: from the trade-off
    curve of the composition of every mechanism the release depends on (the ledger's events),
    via `rero_bound_events(events, kappa=FPR)`.
    """
    from dpgen.privacy.bounds import rero_bound_events

    out: dict = {"epsilon": epsilon, "delta": delta, "per_fpr": {}, "neighbouring": neighbouring}
    for f in fprs:
        row = {"fpr": f}
        if epsilon is not None and delta is not None:
            row["eps_delta"] = eps_delta_tpr_limit(f, epsilon, delta)
        if events:
            b = rero_bound_events(events, f, neighbouring=neighbouring)
            row["mechanism_pld"] = b["bound"]
            row["mechanism_pld_tolerance"] = b["tolerance"]
        out["per_fpr"][_fpr_key(f)] = row
    if epsilon is not None and delta is not None:
        out["auc_eps_delta"] = eps_delta_auc_limit(epsilon, delta)
    out["source"] = ("eps_delta: TPR <= min(1, e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR)) (Kairouz et al. 2015); "
                     "mechanism_pld: 1 - f(FPR) of the trade-off curve of every released mechanism composed (the "
                     "ledger's events), computed by dpgen.privacy.bounds.rero_bound_events on the pessimistic PLD")
    return out


def wilson_interval(k: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [max(0.0, c - h), min(1.0, c + h)]


def one_sided_excess_p(k1: int, n1: int, k0: int, n0: int) -> float:
    """p-value of "proportion 1 > proportion 0" (Fisher's exact test, one-sided)."""
    from scipy.stats import fisher_exact

    if n1 == 0 or n0 == 0:
        return 1.0
    return float(fisher_exact([[k1, n1 - k1], [k0, n0 - k0]], alternative="greater").pvalue)


__all__ = ["FPRS", "auc", "tpr_at_fpr", "roc_curve", "attack_metrics", "eps_delta_tpr_limit", "eps_delta_auc_limit",
           "dp_tpr_limits", "wilson_interval", "one_sided_excess_p"]
