"""The privacy audit can fail at the claimed epsilon.

Through dpgen's one DP-SGD loop (dpgen.privacy.dpsgd) the trade-off audit passes the real
engine at epsilon 10 and fails every broken variant (no noise, sigma/3, no clipping, q = 1),
with image and subject units and K > 1 draws; it fails the real variant too when the
production loop itself is broken. The one-run method says that it cannot certify a
violation at epsilon 10.

The engine's randomness is fresh secret randomness in every run (as in production), so these
tests are statistical: a loop that keeps its claim FAILs with probability at most 1% by
construction (measured in simulation: about 0.03% per run at these settings), and the
broken variants fail with margins far from the edge (all of 300 simulated runs each).
"""

import argparse
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import beta, binom, norm

from dpgen.privacy import accounting, commands, dpsgd
from dpgen.privacy.accounting import _gdp_delta
from dpgen.privacy.audit import (
    METHODS, NO_CLIP_NORM, UNITS, VARIANTS, _load_real_images, claim_llr, clopper_pearson, eps_delta_lower,
    epsilon_lower_bound, gdp_epsilon, gdp_mu_lower, p_value, run_audit, variant_plan,
)

EPS, DELTA = 10.0, 1e-5
# Small enough for one core (a run takes 1-2 s), large enough for power at epsilon 10.
SMALL = dict(m=600, steps=20)
SMALL_CLI = ["--canaries", "600", "--steps", "20", "--n-real", "32"]
BROKEN = ("no_noise", "noise_third", "no_clipping", "full_batch")
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


# ----------------------------------------------------------------------------- statistics


def test_clopper_pearson_known_values():
    # the textbook 95% interval for 5 of 10 (2.5% each side)
    lo, hi = clopper_pearson(5, 10, 0.025)
    assert lo == pytest.approx(0.18709, abs=1e-5) and hi == pytest.approx(0.81291, abs=1e-5)
    # all or nothing: closed forms
    assert clopper_pearson(0, 100, 0.01) == (0.0, pytest.approx(1 - 0.01 ** (1 / 100)))
    assert clopper_pearson(100, 100, 0.01) == (pytest.approx(0.01 ** (1 / 100)), 1.0)
    # the bounds are the binomial tails at level alpha
    lo, hi = clopper_pearson(30, 200, 0.005)
    assert binom.sf(29, 200, lo) == pytest.approx(0.005, rel=1e-6)
    assert binom.cdf(30, 200, hi) == pytest.approx(0.005, rel=1e-6)
    with pytest.raises(ValueError):
        clopper_pearson(3, 2, 0.05)


def test_claim_llr_is_the_likelihood_ratio_of_the_claim():
    sigma, q = 0.9, 0.25
    d = np.array([[-1.0, 0.0, 0.3], [1.0, 2.0, 5.0]])
    dens_in = (1 - q) * norm.pdf(d, 0, sigma) + q * norm.pdf(d, 1, sigma)
    dens_out = norm.pdf(d, 0, sigma)
    np.testing.assert_allclose(claim_llr(d, sigma, q), np.log(dens_in / dens_out).sum(axis=1), rtol=1e-12)
    # q = 1: the Gaussian mechanism, a linear statistic
    np.testing.assert_allclose(claim_llr(d, sigma, 1.0), ((2 * d - 1) / (2 * sigma**2)).sum(axis=1))
    # no overflow far in the tail (the no_clipping variant moves a canary by ~100 C)
    assert np.isfinite(claim_llr(np.array([1e4]), 0.3, 0.1))
    with pytest.raises(ValueError):
        claim_llr(d, 0.0, q)


def test_gdp_and_eps_delta_helpers():
    assert gdp_mu_lower(norm.cdf(1.0), norm.cdf(-1.0)) == pytest.approx(2.0)
    assert gdp_mu_lower(0.1, 0.2) == 0.0 and gdp_mu_lower(1.0, 0.1) == math.inf
    for mu in (0.5, 2.0, 4.0):
        e = gdp_epsilon(mu, DELTA)
        assert _gdp_delta(e, mu) == pytest.approx(DELTA, rel=1e-5)
    assert gdp_epsilon(0.0, DELTA) == 0.0
    assert gdp_epsilon(2.0, DELTA) == pytest.approx(9.98, abs=0.05)  # mu 2 is about epsilon 10 at 1e-5
    assert eps_delta_lower(0.5, 0.05, 0.0) == pytest.approx(math.log(10))
    assert eps_delta_lower(0.99, 0.5, 0.0) == pytest.approx(math.log(0.5 / 0.01))
    assert eps_delta_lower(0.3, 0.3, DELTA) == 0.0


def _perfect(r: int, confidence: float = 0.95) -> float:
    """delta = 0, all r guesses right: p = q^r, so eps = logit(alpha^(1/r))."""
    q = (1 - confidence) ** (1 / r)
    return math.log(q / (1 - q))


def test_one_run_p_value_and_lower_bound():
    for r, v, eps in [(100, 60, 0.0), (100, 80, 1.0), (200, 150, 0.5)]:
        q = 1 / (1 + math.exp(-eps))
        assert p_value(1000, r, v, eps, 0.0) == pytest.approx(binom.sf(v - 1, r, q), rel=1e-9)
    assert p_value(1000, 100, 80, 1.0, 1e-5) > p_value(1000, 100, 80, 1.0, 0.0)  # delta only adds
    assert epsilon_lower_bound(1000, 200, 100, DELTA) == 0.0  # chance level proves nothing
    for r in (10, 50, 100, 200, 500):
        assert epsilon_lower_bound(1000, r, r, 0.0) == pytest.approx(_perfect(r), abs=1e-6)
    # perfect guesses: the bound saturates (one run cannot certify much): ~4.2 at r = 200
    bounds = [epsilon_lower_bound(1000, r, r, DELTA) for r in (20, 50, 100, 200, 500)]
    assert bounds == sorted(bounds) and bounds[-1] < 5.2
    assert epsilon_lower_bound(1000, 200, 200, DELTA) == pytest.approx(4.17, abs=0.02)
    e = epsilon_lower_bound(1000, 200, 170, DELTA)
    assert p_value(1000, 200, 170, e - 1e-6, DELTA) < 0.05 <= p_value(1000, 200, 170, e + 1e-6, DELTA)
    with pytest.raises(ValueError):
        epsilon_lower_bound(100, 200, 150, DELTA)  # r > m


def test_variant_plans_keep_the_noise_std_or_break_one_thing():
    plan = dpsgd.DPSGDPlan(sigma=0.9, sample_rate=0.25, steps=20, max_grad_norm=1.0, n_units=400, batch_size=100,
                           delta=DELTA)
    assert variant_plan(plan, "real") is plan
    assert variant_plan(plan, "no_noise").sigma == 0
    assert variant_plan(plan, "noise_third").sigma == pytest.approx(plan.sigma / 3)
    nc = variant_plan(plan, "no_clipping")
    assert nc.max_grad_norm == NO_CLIP_NORM and nc.sigma * nc.max_grad_norm == pytest.approx(plan.sigma * 1.0)
    assert variant_plan(plan, "full_batch").sample_rate == 1.0
    assert variant_plan(plan, "row_units", n_rows=800).n_units == 800
    # the CLI spells the choices out (no torch import to build the parser): they agree
    assert (commands.AUDIT_METHODS, commands.AUDIT_VARIANTS, commands.AUDIT_UNITS) == (METHODS, VARIANTS, UNITS)


# ----------------------------------------------------------------------------- the trade-off audit


@pytest.fixture(scope="module")
def images():
    return _load_real_images("breastmnist", 32)


@pytest.fixture(scope="module")
def audits(images):
    return {v: run_audit(v, epsilon=EPS, delta=DELTA, real_images=images, **SMALL) for v in ("real", *BROKEN)}


def test_claim_comes_from_the_one_planner(audits):
    r = audits["real"]
    plan = dpsgd.plan_dpsgd(target_epsilon=EPS, delta=DELTA, n_units=r["n_units"], batch_size=0.25 * r["n_units"],
                            steps=r["steps"], max_grad_norm=1.0)
    assert r["sigma"] == pytest.approx(plan.sigma) and r["claimed_epsilon"] == pytest.approx(plan.epsilon_pld)
    assert EPS * 0.99 <= r["claimed_epsilon"] <= EPS
    assert r["n_units"] == 32 + r["n_canaries_in"] and r["n_canaries_in"] == r["m"] // 2
    assert r["method"] == "tradeoff" and r["can_fail"] and r["confidence"] == 0.99
    for res in audits.values():  # the same claim and canaries for every variant
        assert (res["claimed_epsilon"], res["sigma"], res["q"], res["n_units"]) == (
            r["claimed_epsilon"], r["sigma"], r["q"], r["n_units"])


def test_real_engine_passes_at_epsilon_10(audits):
    r = audits["real"]
    assert r["verdict"] == "PASS" and r["passed"] and not r["violation"], r
    assert r["tpr_lo"] <= r["claim_tpr_limit"]
    assert r["engine"]["engine_sigma"] == r["sigma"] and r["engine"]["preflight_max_error"] < 1e-4
    # the canary coordinates move as the claim says (noise std sigma * C / B, signal q * C / B per step):
    # the loop's clipping, noise and normalisation are what the statistic assumes
    n_out = (r["m"] - r["n_canaries_in"]) * r["steps"]
    assert abs(r["step_out_mean"]) < 4 * r["sigma"] / math.sqrt(n_out)
    assert r["step_out_std"] == pytest.approx(r["sigma"], rel=0.05)
    assert r["step_in_mean"] == pytest.approx(r["q"], abs=0.05)
    assert r["step_in_std"] == pytest.approx(math.sqrt(r["sigma"] ** 2 + r["q"] * (1 - r["q"])), rel=0.05)


@pytest.mark.parametrize("variant", BROKEN)
def test_broken_engine_fails_at_epsilon_10(audits, variant):
    r = audits[variant]
    assert r["verdict"] == "FAIL" and r["violation"] and not r["passed"], r
    assert r["tpr_lo"] > r["claim_tpr_limit"] + 0.05  # not at the edge
    assert r["gdp_mu_lower"] > r["claimed_gdp_mu_clt"]


def test_subject_units_and_k2(images):
    kw = dict(epsilon=EPS, delta=DELTA, real_images=images, unit="subject", noise_multiplicity=2, **SMALL)
    real = run_audit("real", **kw)
    assert real["unit"] == "per subject" and real["noise_multiplicity"] == 2
    assert real["n_units"] == 16 + real["n_canaries_in"]  # 32 images in pairs, one subject per canary
    assert real["verdict"] == "PASS", real
    broken = run_audit("noise_third", **kw)
    assert broken["verdict"] == "FAIL" and broken["tpr_lo"] > broken["claim_tpr_limit"] + 0.05, broken


def test_audit_runs_the_production_loop(images, monkeypatch):
    """Break clipping inside dpgen.privacy.dpsgd.DPSGDLoop itself: the *real* variant must fail,
    which it can only do if the audit trains through that loop."""
    original = dpsgd.DPSGDLoop.__post_init__

    def no_clipping(self):
        self.plan = dataclasses.replace(self.plan, max_grad_norm=NO_CLIP_NORM,
                                        sigma=self.plan.sigma * self.plan.max_grad_norm / NO_CLIP_NORM)
        original(self)

    monkeypatch.setattr(dpsgd.DPSGDLoop, "__post_init__", no_clipping)
    r = run_audit("real", epsilon=EPS, delta=DELTA, real_images=images, **SMALL)
    assert r["verdict"] == "FAIL", r


def test_too_few_canaries_is_inconclusive_not_pass(images):
    r = run_audit("no_noise", epsilon=EPS, delta=DELTA, real_images=images, m=8, steps=2)
    assert not r["can_fail"] and r["verdict"] == "INCONCLUSIVE" and not r["passed"], r
    assert r["perfect_tpr_lo"] <= r["claim_tpr_at_perfect_fpr"]


# ----------------------------------------------------------------------------- the one-run method


def test_one_run_cannot_certify_at_epsilon_10(images):
    from dpgen.privacy.audit import format_audit

    r = run_audit("no_noise", method="one_run", epsilon=EPS, delta=DELTA, real_images=images, m=1000, steps=20)
    assert r["method"] == "one_run" and not r["can_fail"] and r["verdict"] == "INCONCLUSIVE", r
    assert r["max_certifiable_epsilon"] == pytest.approx(epsilon_lower_bound(1000, 200, 200, DELTA, 0.99))
    # (nearly) all guesses right, and still no verdict: one run cannot certify more than ~3.7 here
    # (a canary that Poisson sampling never picked in 20 steps looks like an out-canary)
    assert r["max_certifiable_epsilon"] < 4.2 and r["v"] >= r["r"] - 3 and r["eps_lower"] <= r["max_certifiable_epsilon"]
    text = format_audit(r)
    assert f"cannot certify a violation of a claim above {r['max_certifiable_epsilon']:.3f}" in text
    # where it has power, it still catches the broken engine (epsilon 2)
    r2 = run_audit("no_noise", method="one_run", epsilon=2.0, delta=DELTA, real_images=images, m=1000, steps=20)
    assert r2["can_fail"] and r2["verdict"] == "FAIL" and r2["eps_lower"] > 2.0, r2


# ----------------------------------------------------------------------------- the CLI


def _cli(argv, capsys):
    parser = argparse.ArgumentParser(prog="dpgen")
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    rc = args.func(args)
    return rc, capsys.readouterr()


def test_cli_exit_codes(capsys):
    rc, out = _cli(["privacy", "audit", "--epsilon", "10", "--variant", "no_noise", "--json", *SMALL_CLI], capsys)
    res = json.loads(out.out)
    assert rc == 1 and res["verdict"] == "FAIL" and res["method"] == "tradeoff"
    rc, out = _cli(["privacy", "audit", "--epsilon", "10", "--variant", "real", *SMALL_CLI], capsys)
    assert rc == 0, out.out
    text = out.out
    assert "trade-off" in text and "PASS" in text and "what it can certify" in text
    assert "claimed: epsilon = 9.9" in text and "observed: TPR >=" in text
    for bad in (["--canaries", "4"], ["--variant", "row_units"], ["--epsilon", "inf"], ["--delta", "0.1"]):
        rc, out = _cli(["privacy", "audit", *bad], capsys)
        assert rc == 2 and out.out == "" and out.err.startswith("dpgen privacy audit: error:"), (bad, out)


# The audit runs through DPSGD, whose conv per-sample gradients come from dpgen's own sampler
# (dpgen.privacy.engine.DPGradSampleModule): check that path against autograd on awkward convs.
# (Belongs with tests/test_engine.py; kept here because this change came with the audit work.)


class _AwkwardConvs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv1d(2, 4, 3, stride=2, dilation=2, padding=2, groups=2)
        self.c2 = torch.nn.Conv2d(1, 3, (3, 2), stride=(2, 1), padding=(1, 2), bias=False)
        self.c3 = torch.nn.Conv3d(1, 2, 3, padding=1)
        self.head = torch.nn.Linear(4 * 4 + 3 * 4 * 9 + 2 * 27, 1)

    def forward(self, x1, x2, x3):
        h = [self.c1(x1).flatten(1), torch.tanh(self.c2(x2)).flatten(1), self.c3(x3).flatten(1)]
        return self.head(torch.cat(h, 1))[:, 0]


def _awkward_loss(model, batch):
    return (model(batch["x1"], batch["x2"], batch["x3"]) - batch["y"]).pow(2)


def test_engine_conv_per_sample_gradients_are_exact_and_undone_on_close():
    from dpgen.privacy.engine import DPSGD, preflight

    g = torch.Generator().manual_seed(0)
    batch = {"x1": torch.randn(5, 2, 8, generator=g), "x2": torch.randn(5, 1, 7, 6, generator=g),
             "x3": torch.randn(5, 1, 3, 3, 3, generator=g), "y": torch.randn(5, generator=g)}
    model = _AwkwardConvs()
    report = preflight(model, _awkward_loss, batch, mode="hooks")
    assert report.passed and report.max_relative_error < 1e-10, report.to_dict()
    dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
               expected_batch_size=5)
    # with the hooks off (as for a GAN's generator update) gradients still flow to the inputs
    dp.gsm.disable_hooks()
    x1 = batch["x1"].clone().requires_grad_()
    _awkward_loss(dp.gsm, {**batch, "x1": x1}).sum().backward()
    assert x1.grad is not None and x1.grad.abs().sum() > 0
    dp.gsm.enable_hooks()
    plain = dp.close()
    assert not any("_conv_forward" in vars(m) for m in plain.modules())
    plain.zero_grad()
    _awkward_loss(plain, batch).sum().backward()
    assert all(p.grad is not None for p in plain.parameters())  # plain autograd again
