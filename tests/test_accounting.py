"""Tests for dpgen.privacy.accounting: the numbers every DP claim of dpgen rests on."""

import math
import time

import dp_accounting
import numpy as np
import pytest

from dpgen.privacy import accounting as A

DELTA = 1e-5


def pg(sigma, q, steps):
    return {"type": "poisson_gaussian", "sigma": sigma, "sample_rate": q, "steps": steps}


# ----------------------------------------------------------------------------- events


def test_to_dp_event_types():
    ev = A.to_dp_event(pg(1.0, 0.1, 10))
    assert isinstance(ev, dp_accounting.SelfComposedDpEvent) and ev.count == 10
    assert isinstance(ev.event, dp_accounting.PoissonSampledDpEvent)
    assert ev.event.sampling_probability == 0.1 and ev.event.event.noise_multiplier == 1.0
    g = A.to_dp_event({"type": "gaussian", "sigma": 3.0, "count": 2})
    assert isinstance(g, dp_accounting.SelfComposedDpEvent) and g.count == 2
    assert isinstance(g.event, dp_accounting.GaussianDpEvent)
    assert isinstance(A.to_dp_event(pg(1.0, 0.1, 0)), dp_accounting.NoOpDpEvent)
    assert isinstance(A.to_dp_event(pg(0.0, 0.1, 5)), dp_accounting.NonPrivateDpEvent)


@pytest.mark.parametrize(
    "event, msg",
    [
        ({"type": "laplace", "sigma": 1}, "unknown accounting event type"),
        ({"type": "poisson_gaussian", "sigma": 1, "steps": 3}, "missing"),
        (pg(-1.0, 0.1, 3), "sigma"),
        (pg(1.0, 0.0, 3), "sample_rate"),
        (pg(1.0, 1.5, 3), "sample_rate"),
        (pg(1.0, 0.1, -1), "steps"),
        (pg(1.0, 0.1, 2.5), "integer"),
        ({"type": "gaussian", "sigma": 1, "count": -2}, "count"),
        ("not a dict", "dict"),
    ],
)
def test_invalid_events_rejected(event, msg):
    with pytest.raises(ValueError, match=msg):
        A.to_dp_event(event)


def test_zero_steps_and_empty_give_zero_epsilon():
    assert A.epsilon([], DELTA) == 0.0
    assert A.epsilon([pg(1.0, 0.1, 0)], DELTA) == 0.0
    assert A.epsilon([pg(1.0, 0.1, 0)], DELTA, "rdp") == 0.0
    assert A.epsilon([{"type": "gaussian", "sigma": 2.0, "count": 0}], DELTA) == 0.0


def test_no_noise_is_infinite_epsilon():
    assert math.isinf(A.epsilon([pg(0.0, 0.1, 10)], DELTA))
    assert math.isinf(A.epsilon([pg(0.0, 0.1, 10)], DELTA, "rdp"))


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0])
def test_epsilon_rejects_bad_delta(delta):
    with pytest.raises(ValueError, match="delta"):
        A.epsilon([pg(1.0, 0.1, 10)], delta)


def test_epsilon_rejects_unknown_accountant():
    with pytest.raises(ValueError, match="accountant"):
        A.epsilon([pg(1.0, 0.1, 10)], DELTA, "moments")


# ------------------------------------------------------------------------- accountants


@pytest.mark.parametrize("sigma, q, steps", [(0.8, 0.06, 1000), (1.2, 0.01, 5000), (3.0, 0.2, 200), (2.0, 1.0, 10)])
def test_pld_is_tighter_than_rdp(sigma, q, steps):
    e_pld = A.epsilon([pg(sigma, q, steps)], DELTA, "pld")
    e_rdp = A.epsilon([pg(sigma, q, steps)], DELTA, "rdp")
    assert 0 < e_pld <= e_rdp
    assert e_pld > 0.75 * e_rdp  # same mechanism: they must not disagree wildly


def test_epsilon_decreases_with_sigma_and_grows_with_steps():
    sigmas = [0.7, 0.9, 1.2, 1.6, 2.5, 4.0]
    eps = [A.epsilon([pg(s, 0.06, 1000)], DELTA) for s in sigmas]
    assert all(a > b for a, b in zip(eps, eps[1:]))
    by_steps = [A.epsilon([pg(1.2, 0.06, t)], DELTA) for t in (10, 100, 1000)]
    assert by_steps[0] < by_steps[1] < by_steps[2]


@pytest.mark.filterwarnings("ignore:Optimal order is the")
def test_rdp_matches_opacus_on_the_same_orders():
    """Opacus' RDP accountant is an independent implementation of the same analysis.

    On integer orders both use the exact binomial expansion and must agree to
    rounding.  On fractional orders dp_accounting's series is more conservative
    than Opacus' (whose values match numerical quadrature), so ours may only be
    slightly *larger* there, never smaller.
    """
    from opacus.accountants import RDPAccountant

    int_orders = list(range(2, 64)) + [128, 256]
    for sigma, q, steps in [(1.0, 0.06, 1000), (2.0, 0.01, 3000), (0.9, 0.2, 50)]:
        acc = RDPAccountant()
        acc.history = [(sigma, q, steps)]
        opacus_int = acc.get_epsilon(DELTA, alphas=int_orders)
        ours_int = A.epsilon_rdp([pg(sigma, q, steps)], DELTA, orders=int_orders)
        assert ours_int == pytest.approx(opacus_int, rel=1e-9)

        opacus_default = acc.get_epsilon(DELTA, alphas=RDPAccountant.DEFAULT_ALPHAS)
        ours_default_orders = A.epsilon_rdp([pg(sigma, q, steps)], DELTA, orders=RDPAccountant.DEFAULT_ALPHAS)
        assert opacus_default * (1 - 1e-9) <= ours_default_orders <= opacus_default * 1.02
        # our wide grid is at least as good as Opacus' default grid on our own values
        assert A.epsilon([pg(sigma, q, steps)], DELTA, "rdp") <= ours_default_orders * (1 + 1e-9)


def test_gaussian_event_matches_analytic_gaussian_mechanism():
    """k sensitivity-1 releases with noise sigma = one release with sigma/sqrt(k)."""
    for sigma, count in [(5.0, 1), (20.0, 4), (2.0, 1)]:
        ours = A.epsilon([{"type": "gaussian", "sigma": sigma, "count": count}], DELTA)
        exact = dp_accounting.get_epsilon_gaussian(sigma / math.sqrt(count), DELTA)
        assert exact <= ours * (1 + 1e-9) + 1e-9  # pessimistic PLD: an upper bound
        assert ours == pytest.approx(exact, rel=5e-3, abs=2e-4)


def test_composition_is_in_one_accountant():
    a, b = pg(1.2, 0.06, 1000), {"type": "gaussian", "sigma": 5.0, "count": 1}
    ea, eb, eab = A.epsilon([a], DELTA), A.epsilon([b], DELTA), A.epsilon([a, b], DELTA)
    assert max(ea, eb) < eab < ea + eb


def test_adaptive_pld_agrees_with_a_finer_discretisation():
    for sigma, q, steps in [(1.18, 0.06, 1000), (2.34, 0.001, 100_000), (5.0, 0.1, 2000)]:
        adaptive = A.epsilon([pg(sigma, q, steps)], DELTA)
        fine = A.epsilon_pld_fixed([pg(sigma, q, steps)], DELTA, 1e-4)
        assert abs(adaptive - fine) / fine < 0.01


def test_fixed_coarse_discretisation_is_pessimistic():
    """Coarse pessimistic PLD over-states epsilon; the adaptive value is below it."""
    ev = [pg(2.34, 0.001, 100_000)]
    coarse = A.epsilon_pld_fixed(ev, DELTA, 1e-2)
    assert A.epsilon(ev, DELTA) < coarse


# ------------------------------------------------------------------------- calibration


def test_calibrate_reference_case_is_fast_and_on_the_safe_side():
    t0 = time.perf_counter()
    sigma = A.calibrate_sigma(10.0, DELTA, 0.06, 1000)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0
    eps = A.epsilon([pg(sigma, 0.06, 1000)], DELTA)
    assert eps <= 10.0
    assert eps >= 0.98 * 10.0
    # near-minimal: 0.3% less noise already exceeds the target
    assert A.epsilon([pg(sigma * 0.997, 0.06, 1000)], DELTA) > 10.0
    assert 1.1 < sigma < 1.3


@pytest.mark.parametrize("target, q, steps", [(1.0, 0.06, 1000), (3.0, 0.01, 5000), (8.0, 0.2, 300)])
def test_calibrate_meets_target(target, q, steps):
    sigma = A.calibrate_sigma(target, DELTA, q, steps)
    eps = A.epsilon([pg(sigma, q, steps)], DELTA)
    assert 0.98 * target <= eps <= target


def test_calibrate_single_gaussian_matches_analytic():
    sigma = A.calibrate_sigma(1.0, DELTA, 1.0, 1)
    exact = dp_accounting.get_sigma_gaussian(1.0, DELTA)
    assert exact <= sigma <= exact * 1.003


def test_calibrate_with_extra_events_budgets_the_composition():
    hist = {"type": "gaussian", "sigma": 5.0, "count": 1}
    plain = A.calibrate_sigma(10.0, DELTA, 0.06, 1000)
    with_hist = A.calibrate_sigma(10.0, DELTA, 0.06, 1000, extra_events=[hist])
    assert with_hist > plain
    eps = A.epsilon([pg(with_hist, 0.06, 1000), hist], DELTA)
    assert 0.98 * 10.0 <= eps <= 10.0


def test_calibrate_with_rdp_accountant():
    sigma = A.calibrate_sigma(10.0, DELTA, 0.06, 1000, accountant="rdp")
    eps = A.epsilon([pg(sigma, 0.06, 1000)], DELTA, "rdp")
    assert 0.98 * 10.0 <= eps <= 10.0
    assert sigma > A.calibrate_sigma(10.0, DELTA, 0.06, 1000)  # RDP is looser -> more noise


def test_calibrate_infinite_epsilon_is_non_private():
    assert A.calibrate_sigma(float("inf"), DELTA, 0.06, 1000) == 0.0


def test_calibrate_extra_events_exceeding_target():
    with pytest.raises(ValueError, match="extra events alone"):
        A.calibrate_sigma(1.0, DELTA, 0.1, 100, extra_events=[{"type": "gaussian", "sigma": 0.5, "count": 1}])


def test_calibrate_impossible_target():
    with pytest.raises(ValueError, match="cannot reach"):
        A.calibrate_sigma(1e-6, DELTA, 1.0, 1000)


def test_calibrate_vacuous_delta():
    with pytest.raises(ValueError, match="vacuous"):
        A.calibrate_sigma(5.0, 0.5, 0.01, 10)


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(target_epsilon=0.0), "target_epsilon"),
        (dict(target_epsilon=-1.0), "target_epsilon"),
        (dict(target_epsilon=float("nan")), "target_epsilon"),
        (dict(delta=0.0), "delta"),
        (dict(delta=1.0), "delta"),
        (dict(sample_rate=0.0), "sample_rate"),
        (dict(sample_rate=1.1), "sample_rate"),
        (dict(steps=0), "steps"),
        (dict(steps=1.5), "steps"),
        (dict(accountant="moments"), "accountant"),
    ],
)
def test_calibrate_validates_arguments(kwargs, msg):
    args = dict(target_epsilon=1.0, delta=DELTA, sample_rate=0.1, steps=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=msg):
        A.calibrate_sigma(**args)


def test_rdp_order_grid_is_wide():
    orders = np.asarray(A.RDP_ORDERS)
    assert orders.min() <= 1.1 and orders.max() >= 4096
    assert np.all(np.diff(orders) > 0)
