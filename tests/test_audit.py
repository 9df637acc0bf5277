"""The privacy audit can fail: through the real DP-SGD engine the empirical lower bound on
epsilon stays below the claim; with noise or clipping switched off it goes above it."""

import argparse
import json
import math

import pytest
import torch
from scipy.stats import binom

from dpgen.privacy import accounting, commands
from dpgen.privacy.audit import epsilon_lower_bound, p_value, run_audit

EPS, DELTA = 2.0, 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _perfect(r: int, confidence: float = 0.95) -> float:
    """delta = 0, all r guesses right: p = q^r, so eps = logit(alpha^(1/r))."""
    q = (1 - confidence) ** (1 / r)
    return math.log(q / (1 - q))


def test_p_value_without_delta_is_a_binomial_tail():
    for r, v, eps in [(100, 60, 0.0), (100, 80, 1.0), (200, 150, 0.5)]:
        q = 1 / (1 + math.exp(-eps))
        assert p_value(1000, r, v, eps, 0.0) == pytest.approx(binom.sf(v - 1, r, q), rel=1e-9)
    # the delta term only ever adds
    assert p_value(1000, 100, 80, 1.0, 1e-5) > p_value(1000, 100, 80, 1.0, 0.0)


def test_lower_bound_known_values():
    # chance-level guessing proves nothing
    assert epsilon_lower_bound(1000, 100, 50, DELTA) == 0.0
    assert epsilon_lower_bound(1000, 200, 100, DELTA) == 0.0
    assert epsilon_lower_bound(1000, 100, 0, DELTA) == 0.0
    # perfect guessing, delta = 0: closed form (100 -> 3.49, 200 -> 4.19)
    for r in (10, 50, 100, 200, 500):
        assert epsilon_lower_bound(1000, r, r, 0.0) == pytest.approx(_perfect(r), abs=1e-6)
    assert epsilon_lower_bound(1000, 100, 100, 0.0) == pytest.approx(3.4930, abs=1e-3)
    # perfect guesses: the bound grows with r, and saturates (one run cannot certify much)
    bounds = [epsilon_lower_bound(1000, r, r, DELTA) for r in (20, 50, 100, 200, 500)]
    assert bounds == sorted(bounds) and bounds[-1] < 5.2
    # more correct guesses, larger bound; delta and higher confidence make it smaller
    by_v = [epsilon_lower_bound(1000, 200, v, DELTA) for v in (110, 130, 150, 170, 190, 200)]
    assert by_v == sorted(by_v) and by_v[0] < by_v[-1]
    assert epsilon_lower_bound(1000, 200, 200, 1e-3) < epsilon_lower_bound(1000, 200, 200, 0.0)
    assert epsilon_lower_bound(1000, 200, 180, DELTA, 0.99) < epsilon_lower_bound(1000, 200, 180, DELTA, 0.95)
    # the bound is where the p-value crosses 0.05
    e = epsilon_lower_bound(1000, 200, 170, DELTA)
    assert p_value(1000, 200, 170, e - 1e-6, DELTA) < 0.05 <= p_value(1000, 200, 170, e + 1e-6, DELTA)
    with pytest.raises(ValueError):
        epsilon_lower_bound(100, 200, 150, DELTA)  # r > m


@pytest.fixture(scope="module")
def audits():
    return {v: run_audit(v, epsilon=EPS, delta=DELTA, m=1000, steps=40, seed=0) for v in ("real", "no_noise", "no_clipping")}


def test_claim_comes_from_the_accountant(audits):
    r = audits["real"]
    event = accounting.poisson_gaussian_event(r["sigma"], r["q"], r["steps"])
    assert r["claimed_epsilon"] == pytest.approx(accounting.epsilon([event], DELTA, "pld"))
    assert EPS * 0.99 <= r["claimed_epsilon"] <= EPS
    assert r["sigma"] == pytest.approx(accounting.calibrate_sigma(EPS, DELTA, r["q"], r["steps"]))
    for res in audits.values():  # same claim, same canaries, same guess budget for every variant
        assert (res["claimed_epsilon"], res["m"], res["r"], res["n_canaries_in"]) == (
            r["claimed_epsilon"], r["m"], r["r"], r["n_canaries_in"])


def test_real_engine_stays_below_the_claim(audits):
    r = audits["real"]
    assert r["passed"] and r["eps_lower"] < r["claimed_epsilon"]
    # ...and the audit does see the canaries through the noise (better than chance)
    assert r["v"] > r["r"] // 2 and r["eps_lower"] > 0


@pytest.mark.parametrize("variant", ["no_noise", "no_clipping"])
def test_broken_engine_exceeds_the_claim(audits, variant):
    r = audits[variant]
    assert not r["passed"]
    assert r["eps_lower"] > r["claimed_epsilon"] + 1.0, r


def _cli(argv, capsys):
    parser = argparse.ArgumentParser(prog="dpgen")
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    rc = args.func(args)
    return rc, capsys.readouterr()


def test_cli_exit_codes(capsys):
    small = ["--canaries", "400", "--guesses", "50", "--steps", "20"]
    # real engine, K = 2 draws per row (exercises the per-unit folding): PASS, exit 0
    rc, out = _cli(["privacy", "audit", *small, "--noise-multiplicity", "2", "--json"], capsys)
    res = json.loads(out.out)
    assert rc == 0 and res["passed"] and res["eps_lower"] < res["claimed_epsilon"]
    assert res["noise_multiplicity"] == 2 and res["m"] == 400 and res["r"] == 100
    rc, out = _cli(["privacy", "audit", *small, "--variant", "no_noise"], capsys)
    assert rc == 1
    assert "FAIL" in out.out and "EXCEEDS the claim" in out.out
    rc, out = _cli(["privacy", "audit", "--canaries", "10", "--guesses", "50"], capsys)
    assert rc == 2 and "guesses" in out.err


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
