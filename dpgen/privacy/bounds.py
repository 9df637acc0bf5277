"""Reconstruction-robustness (ReRo) bounds for DP-SGD.

Why this module exists
----------------------
An epsilon of 8 means little to a data-protection officer; "an attacker who could
guess a patient's image with prior probability kappa succeeds with probability at
most B after seeing the model" is what a release review needs.  Hayes, Mahloujifar
& Balle (NeurIPS 2023) and Kaissis et al. (2023) show that for any mechanism whose
privacy profile is delta(eps),

    ReRo(kappa) <= inf_eps [ kappa * e^eps + delta(eps) ]  =  1 - f(kappa),

where f is the mechanism's trade-off (type-I/type-II) curve: reconstruction is a
hypothesis test whose type-I error is the prior success rate kappa.

A release usually depends on several mechanisms (DP-SGD of the generator, a DP autoencoder
fine-tune, DP histograms): ``rero_bound_events`` evaluates the bound on the composition of
all of them (the ledger's events), which is what a release review must quote; the
one-mechanism functions below are that computation for a single DP-SGD event.

Two evaluations are provided for T steps of Poisson-subsampled Gaussian DP-SGD
(noise multiplier sigma, sample rate q):

``gdp``
    Closed form through the central-limit (mu-Gaussian-DP) approximation
    (Dong, Roth & Su): ``mu = q * sqrt(T * (exp(1/sigma^2) - 1))`` and
    ``bound = 1 - Phi(Phi^-1(1 - kappa) - mu)``.  Instant, but an *approximation*:
    for small q*T it can under-state the risk in the tails (see the reference
    points in the tests, e.g. sigma=1, q=0.01, T=1000, kappa=1e-3: 0.0037 vs 0.0041).

``tight``
    The infimum above evaluated on the privacy loss distribution (PLD) of the
    composed mechanism from ``dp_accounting`` with pessimistic (connect-the-dots)
    discretisation.  Pessimistic rounding over-states delta(eps) at every eps and
    *any* eps gives a valid bound, so the value returned is a certified upper bound
    on 1 - f(kappa) (up to floating point and dp_accounting's 1e-22-level truncated
    tail mass, which it also books pessimistically).  The eps-minimisation uses that
    ``kappa*e^eps + delta(eps)`` is unimodal in eps (its derivative is
    ``e^eps * (kappa - Q[L > eps])`` and ``Q[L > eps]`` decreases), so a coarse grid
    followed by bounded Brent search finds the minimum.  The discretisation is
    refined (interval halved) until two successive values agree to ``rtol``
    relative; the reported ``tolerance`` is that last change, an a-posteriori
    estimate of the distance to the exact value (convergence is fast, so it
    over-states the remaining error).  Only eps >= 0 is searched, as in the
    (eps, delta)-DP statement of the theorem.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.stats import norm

from dp_accounting.pld import privacy_loss_distribution as _pld

__all__ = ["METHODS", "eps_delta_auc_limit", "eps_delta_tpr_limit", "gdp_mu", "rero_bound", "rero_bound_events", "rero_bound_gdp", "rero_bound_tight"]

METHODS = ("tight", "gdp")

#: First PLD discretisation interval for the tight bound; halved until converged.
TIGHT_START_INTERVAL = 1e-2
#: Finest interval the tight bound will use (cost ~ 1/interval).
TIGHT_MIN_INTERVAL = 1.25e-4
#: Default relative convergence tolerance of the tight bound.
TIGHT_RTOL = 1e-2


def _validate(sigma, sample_rate, steps, kappa) -> tuple[float, float, int, float]:
    for name, v in (("sigma", sigma), ("sample_rate", sample_rate), ("steps", steps), ("kappa", kappa)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ValueError(f"{name} must be a number, got {v!r}")
    sigma, q, kappa = float(sigma), float(sample_rate), float(kappa)
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be finite and > 0, got {sigma}")
    if not 0 < q <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {q}")
    if float(steps) != int(steps) or int(steps) < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not 0 < kappa < 1:
        raise ValueError(f"kappa (the attacker's prior success probability) must be in (0, 1), got {kappa}")
    return sigma, q, int(steps), kappa


def gdp_mu(sigma: float, sample_rate: float, steps: int) -> float:
    """mu of the CLT (mu-GDP) approximation of DP-SGD."""
    return sample_rate * math.sqrt(steps * math.expm1(1.0 / sigma**2))


def rero_bound_gdp(sigma: float, sample_rate: float, steps: int, kappa: float) -> float:
    """Closed-form ReRo bound via mu-GDP: ``1 - Phi(Phi^-1(1 - kappa) - mu)``."""
    sigma, q, steps, kappa = _validate(sigma, sample_rate, steps, kappa)
    mu = gdp_mu(sigma, q, steps)
    if not math.isfinite(mu):
        return 1.0
    # norm.isf(kappa) == Phi^-1(1-kappa) and norm.sf(x) == 1-Phi(x), both accurate in the tails
    return float(norm.sf(norm.isf(kappa) - mu))


def _tight_at(events: list[dict], kappa: float, interval: float, neighbouring: str) -> tuple[float, float]:
    """(bound, argmin eps) on the pessimistic PLD of the composed events at one interval."""
    from dpgen.privacy.accounting import composed_pld

    pld = composed_pld(events, interval, neighbouring)
    if pld is None:  # nothing private happened: the attacker learns nothing
        return kappa, 0.0

    def g(eps: float) -> float:
        return kappa * math.exp(eps) + float(pld.get_delta_for_epsilon(float(eps)))

    hi = math.log(1.0 / kappa)  # beyond this kappa*e^eps >= 1: the bound is vacuous
    grid = np.linspace(0.0, hi, 25)
    vals = [g(e) for e in grid]
    i = int(np.argmin(vals))
    best_eps, best = float(grid[i]), float(vals[i])
    a, b = float(grid[max(i - 1, 0)]), float(grid[min(i + 1, len(grid) - 1)])
    if b > a:
        res = minimize_scalar(g, bounds=(a, b), method="bounded", options={"xatol": 1e-4 * max(1.0, hi)})
        if res.fun < best:
            best, best_eps = float(res.fun), float(res.x)
    return min(best, 1.0), best_eps


def rero_bound_events(events: list[dict], kappa: float, rtol: float = TIGHT_RTOL,
                      neighbouring: str = "add_remove") -> dict:
    """Certified (pessimistic-PLD) ReRo upper bound for the composition of ledger events
    (every mechanism a release depends on), with a convergence tolerance. Also the largest
    TPR any membership test can reach at FPR = kappa (1 - f(kappa))."""
    from dpgen.privacy.accounting import validate_event

    events = [validate_event(e) for e in events]
    if not 0 < float(kappa) < 1:
        raise ValueError(f"kappa (the attacker's prior success probability) must be in (0, 1), got {kappa}")
    kappa = float(kappa)
    if any(e["sigma"] == 0 and (e.get("steps", e.get("count", 1)) or 0) > 0 for e in events):
        return {"bound": 1.0, "method": "tight", "tolerance": 0.0, "kappa": kappa, "events": events,
                "neighbouring": neighbouring, "note": "a mechanism ran without noise: no bound"}
    interval = TIGHT_START_INTERVAL
    prev = None
    best = None
    change = 0.0
    while True:
        bound, eps_opt = _tight_at(events, kappa, interval, neighbouring)
        if best is None or bound < best[0]:
            best = (bound, eps_opt, interval)  # each value is a valid upper bound
        if prev is not None:
            change = abs(prev - bound)
            if change <= rtol * bound or interval / 2 < TIGHT_MIN_INTERVAL:
                break
        prev = bound
        interval /= 2
    bound, eps_opt, used = best
    return {
        "bound": bound,
        "method": "tight",
        "tolerance": change,
        "tolerance_kind": "a-posteriori discretisation error (change over the last halving of the PLD interval); bound is a certified upper bound",
        "kappa": kappa,
        "events": events,
        "neighbouring": neighbouring,
        "epsilon_at_optimum": eps_opt,
        "value_discretization_interval": used,
    }


def rero_bound_tight(
    sigma: float, sample_rate: float, steps: int, kappa: float, rtol: float = TIGHT_RTOL
) -> dict:
    """Certified (pessimistic-PLD) ReRo upper bound of one DP-SGD mechanism."""
    sigma, q, steps, kappa = _validate(sigma, sample_rate, steps, kappa)
    out = rero_bound_events([{"type": "poisson_gaussian", "sigma": sigma, "sample_rate": q, "steps": steps}], kappa,
                            rtol)
    out.pop("events")
    return {**out, "sigma": sigma, "sample_rate": q, "steps": steps}


def rero_bound(sigma: float, sample_rate: float, steps: int, kappa: float, method: str = "tight") -> dict:
    """ReRo bound as a JSON-able dict (what goes into the ledger's "bound" entries).

    ``method="tight"``: certified PLD bound with a tolerance (default; use this in
    reports).  ``method="gdp"``: the CLT closed form (instant approximation,
    ``tolerance`` is None because its error is not controlled).
    """
    if method == "tight":
        return rero_bound_tight(sigma, sample_rate, steps, kappa)
    if method == "gdp":
        sigma, q, steps, kappa = _validate(sigma, sample_rate, steps, kappa)
        return {
            "bound": rero_bound_gdp(sigma, q, steps, kappa),
            "method": "gdp",
            "tolerance": None,
            "tolerance_kind": "none: central-limit approximation, may under-state tail risk",
            "kappa": kappa,
            "sigma": sigma,
            "sample_rate": q,
            "steps": steps,
            "mu": gdp_mu(sigma, q, steps),
        }
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


# ----------------------------------------------------------------------------- (epsilon, delta) alone


def eps_delta_tpr_limit(fpr: float, epsilon: float, delta: float) -> float:
    """max TPR at `fpr` for any (epsilon, delta)-DP mechanism (Kairouz et al. 2015)."""
    if not math.isfinite(epsilon):
        return 1.0
    return float(min(1.0, math.exp(epsilon) * fpr + delta, 1 - math.exp(-epsilon) * (1 - delta - fpr)))


def eps_delta_auc_limit(epsilon: float, delta: float, grid: int = 20001) -> float:
    """max ROC-AUC for (epsilon, delta)-DP: the area under the limit curve above."""
    if not math.isfinite(epsilon):
        return 1.0
    a = np.linspace(0.0, 1.0, grid)
    t = np.minimum.reduce([np.ones_like(a), math.exp(epsilon) * a + delta, 1 - math.exp(-epsilon) * (1 - delta - a)])
    return float(np.trapezoid(np.clip(t, 0, 1), a))
