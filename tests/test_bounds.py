"""Tests for dpgen.privacy.bounds: reconstruction-robustness bounds for DP-SGD."""

import math
import time

import pytest
from scipy.stats import norm

from dpgen.privacy import accounting
from dpgen.privacy import bounds as B

# (sigma, q, T, kappa, tight reference, closed-form reference); the tight references
# come from an Edgeworth accountant.
REFERENCE = [
    (1.0, 0.1, 2000, 1e-4, 0.94, 0.98),
    (2.0, 0.1, 2000, 1e-4, 0.088, 0.091),
    (5.0, 0.1, 2000, 1e-4, 0.0025, 0.0024),
    (1.0, 0.01, 1000, 1e-3, 0.0041, 0.0037),
]


def _two_sig(x):
    return float(f"{x:.2g}")


@pytest.mark.parametrize("sigma, q, steps, kappa, tight_ref, gdp_ref", REFERENCE)
def test_closed_form_reference_points(sigma, q, steps, kappa, tight_ref, gdp_ref):
    b = B.rero_bound_gdp(sigma, q, steps, kappa)
    assert _two_sig(b) == gdp_ref
    assert b == pytest.approx(gdp_ref, rel=0.02)


@pytest.mark.parametrize("sigma, q, steps, kappa, tight_ref, gdp_ref", REFERENCE)
def test_tight_reference_points(sigma, q, steps, kappa, tight_ref, gdp_ref):
    t0 = time.perf_counter()
    r = B.rero_bound(sigma, q, steps, kappa, method="tight")
    assert time.perf_counter() - t0 < 3.0
    assert r["bound"] == pytest.approx(tight_ref, rel=0.05)
    assert r["method"] == "tight"
    assert 0 <= r["tolerance"] <= 0.01 * r["bound"]
    assert (r["kappa"], r["sigma"], r["sample_rate"], r["steps"]) == (kappa, sigma, q, steps)


def test_tight_is_certified_for_the_plain_gaussian_mechanism():
    """With q = 1 the composed mechanism is exactly Gaussian (mu = sqrt(T)/sigma), so
    1 - f(kappa) is known in closed form: the tight bound must be above it, and close."""
    for sigma, steps, kappa in [(2.0, 4, 1e-3), (1.0, 1, 1e-2), (4.0, 16, 1e-4), (3.0, 1, 0.1)]:
        exact = float(norm.sf(norm.isf(kappa) - math.sqrt(steps) / sigma))
        r = B.rero_bound(sigma, 1.0, steps, kappa)
        assert r["bound"] >= exact * (1 - 1e-9)
        assert r["bound"] == pytest.approx(exact, rel=1e-3)


def test_tight_bound_is_below_the_eps_delta_bound():
    """inf over eps is at most the value at the (eps, delta) the accountant reports."""
    sigma, q, steps, kappa, delta = 1.2, 0.06, 1000, 1e-3, 1e-5
    eps = accounting.epsilon([{"type": "poisson_gaussian", "sigma": sigma, "sample_rate": q, "steps": steps}], delta)
    r = B.rero_bound(sigma, q, steps, kappa)
    assert r["bound"] <= kappa * math.exp(eps) + delta + r["tolerance"]


def test_bounds_are_monotone():
    by_sigma = [B.rero_bound(s, 0.1, 500, 1e-3)["bound"] for s in (1.0, 1.5, 2.5, 4.0)]
    assert all(a > b for a, b in zip(by_sigma, by_sigma[1:]))
    by_kappa = [B.rero_bound(2.0, 0.1, 500, k)["bound"] for k in (1e-4, 1e-3, 1e-2)]
    assert all(a < b for a, b in zip(by_kappa, by_kappa[1:]))
    gdp_sigma = [B.rero_bound_gdp(s, 0.1, 500, 1e-3) for s in (1.0, 1.5, 2.5, 4.0)]
    assert all(a > b for a, b in zip(gdp_sigma, gdp_sigma[1:]))


def test_bound_is_at_least_the_prior_and_at_most_one():
    for sigma in (0.5, 3.0, 50.0):
        for method in ("tight", "gdp"):
            b = B.rero_bound(sigma, 0.05, 200, 1e-3, method=method)["bound"]
            assert 1e-3 * (1 - 1e-9) <= b <= 1.0


def test_gdp_dict():
    r = B.rero_bound(1.0, 0.1, 2000, 1e-4, method="gdp")
    assert r["method"] == "gdp" and r["tolerance"] is None
    assert r["mu"] == pytest.approx(0.1 * math.sqrt(2000 * math.expm1(1.0)))
    assert r["bound"] == B.rero_bound_gdp(1.0, 0.1, 2000, 1e-4)


@pytest.mark.parametrize(
    "args, msg",
    [
        ((0.0, 0.1, 10, 1e-3), "sigma"),
        ((-1.0, 0.1, 10, 1e-3), "sigma"),
        ((1.0, 0.0, 10, 1e-3), "sample_rate"),
        ((1.0, 1.2, 10, 1e-3), "sample_rate"),
        ((1.0, 0.1, 0, 1e-3), "steps"),
        ((1.0, 0.1, 2.5, 1e-3), "steps"),
        ((1.0, 0.1, 10, 0.0), "kappa"),
        ((1.0, 0.1, 10, 1.0), "kappa"),
    ],
)
def test_validation(args, msg):
    with pytest.raises(ValueError, match=msg):
        B.rero_bound_gdp(*args)
    with pytest.raises(ValueError, match=msg):
        B.rero_bound(*args)


def test_unknown_method():
    with pytest.raises(ValueError, match="method"):
        B.rero_bound(1.0, 0.1, 10, 1e-3, method="edgeworth")
