"""An empirical privacy audit of dpgen's one DP-SGD loop, with the power to fail at the claim.

What is audited
---------------
`dpgen.privacy.dpsgd`: the planner (`plan_dpsgd`, which calibrates sigma to the claimed
epsilon) and the loop (`DPSGDLoop`: preflight, secret Poisson sampling of privacy units, per-row
draws, physical chunks that never split a unit, per-unit folding of rows and K draws, Opacus
clipping, noise of std sigma * C from `SecretStreams`, division by the expected batch). Every
DP-SGD run in dpgen (the generators' fine-tuning, the evaluation's DP classifiers) goes
through that code, and so does this audit: there is no sibling loop to drift away from it.
The engine's secret randomness comes from `fresh_secret_streams()`; the auditor never sees
which units a step sampled or what noise was drawn. Its own randomness (which canaries are
in, the split of the canaries, thresholds) is public, from the audit seed.

The model is a small CNN trained on real images (ballast that exercises the conv per-sample
gradients and makes the batches realistic) plus a linear canary head with one coordinate per
canary. Canary i is a privacy unit whose gradient is -A e_i (A = `canary_norm` > C, a little
different in each of the K draws): a white-box "Dirac" gradient canary, the strongest
gradient an adversary who chooses a unit can insert. Real units never touch the head, so the
canaries' coordinates move only by their own clipped gradient and the noise. Per privacy
unit "subject", a canary is two rows that push the same coordinate and real images are
grouped in pairs: the guarantee is per subject, and a subject contributes one clipped gradient.

Variants: the audit's CLAIM is always the calibrated plan (sigma, q, C, T). The engine is
handed that plan ("real") or a broken copy of it: "no_noise" (sigma 0), "noise_third"
(sigma / 3), "no_clipping" (C = 1e6, sigma rescaled so the noise std stays sigma * C),
"full_batch" (q = 1: every unit in every step), and with subject units "row_units" (the loop
treats every row as a unit: a subject is sampled and clipped row by row).

Method "tradeoff" (default): a hypothesis test of the claimed trade-off curve
-------------------------------------------------------------------------------
The accountant's guarantee covers the whole sequence of T updates (DP-SGD is analysed as the
adaptive composition of its steps, every intermediate model released), so the auditor reads
every canary's coordinate after every step. Step t moves canary i by
    d_t = (w_t - w_{t-1}) * B / (lr * C)     (B: the claim's expected batch)
which, if the engine is what the claim says, is b_t + sigma * z_t with z_t ~ N(0, 1) and
b_t ~ Bernoulli(q) for a canary in the data (b_t = 0 for one that is out). The pair
(in: mixture, out: N(0, sigma^2)) per step, composed T times, is exactly the dominating pair of
the claimed Poisson-subsampled Gaussian mechanism, and the most powerful test between them is
the Neyman-Pearson log-likelihood ratio
    S = sum_t log(1 - q + q * exp((2 d_t - 1) / (2 sigma^2))),
computed with the CLAIMED sigma and q. Guess "in" when S > tau. Under any (sigma, q, T)-DP-SGD
engine that keeps its claim, every test, this one included, has
    TPR <= 1 - f(FPR)
where f is the claimed mechanism's trade-off curve (`bounds.rero_bound_events` of the claimed
event: the pessimistic-PLD value, a certified upper bound on 1 - f).

The test: half of the canaries are in, half out (a seeded permutation); each half is split
again into a selection part and an evaluation part. tau is chosen on the selection part
(the threshold whose predicted margin over the claim is largest); the evaluation part is then
scored once at that tau: k1 of n1 in-canaries and k0 of n0 out-canaries above tau give
Clopper-Pearson bounds TPR_lo (one-sided, level alpha/2) and FPR_hi (alpha/2), and the audit
FAILS if TPR_lo > 1 - f(FPR_hi). Why the threshold is chosen on held-out canaries and not
from a grid fixed in advance: the claim's NP statistic of a noise-free sequence lies BELOW
most of the claim's null distribution (the claim expects noise), so thresholds placed at the
claim's own FPR levels miss a no-noise engine (simulated at epsilon 10, q 0.25, T 40: none of
500 in-canaries above the threshold of claimed FPR 0.1, 30 above that of FPR 0.3, while its
out-canaries all sit at one value below both), whereas a threshold chosen on other canaries
separates in from out perfectly.

Validity (no false FAIL beyond 1 - confidence): for the real engine each canary's sequence
d_1..d_T depends only on its own Poisson inclusions and its own noise coordinate (iid across
coordinates, sampling iid across units, canaries on disjoint coordinates, real units at zero
there), so given the public assignment the evaluation canaries' indicators [S > tau] are
independent Bernoulli(TPR) and Bernoulli(FPR), and tau is independent of them (chosen on
other canaries). With probability >= 1 - alpha both TPR_lo <= TPR and FPR_hi >= FPR, and then
TPR_lo <= TPR <= 1 - f(FPR) <= 1 - f(FPR_hi) (1 - f is non-decreasing): no FAIL. For the real
engine the observations follow the claimed pair exactly, so its true point lies ON the
claimed curve: the audit is tight, and all of its slack is the confidence intervals.

Before training, `can_fail` asks whether a perfect attack (all evaluation in-canaries above
tau, no out-canary) would show a violation with this many canaries. If not, the verdict is
INCONCLUSIVE, never PASS.

For information (not the verdict): the Gaussian-DP mu lower bound
Phi^-1(TPR_lo) - Phi^-1(FPR_hi) (Nasr et al. 2023; Andrew et al. 2024 fit mu this way) and the
epsilon a mu-GDP mechanism has at delta, and the classic (epsilon, delta) lower bound
max(log((TPR_lo - delta) / FPR_hi), log((1 - delta - FPR_hi) / (1 - TPR_lo))).

Method "one_run": Steinke, Nasr & Jagielski 2023
-----------------------------------------------
Canaries in with probability 1/2 each; one training run; the auditor reads the final
weights only (score = how far each canary's coordinate moved), guesses "in" for the `guesses`
highest and "out" for the `guesses` lowest, and turns the v correct guesses of r into an
epsilon lower bound (Theorem 3.2 with the delta term). Valid for any (epsilon, delta)-DP
mechanism, but it cannot certify more than `epsilon_lower_bound(m, r, r, delta)` (about 4.2
for m = 1000, r = 200): asked about epsilon 10, it says that it cannot certify a violation
(INCONCLUSIVE).

What it does not show
---------------------
A PASS is the absence of evidence of a violation against this attack on this small model: it
does not prove the claim. The audit checks the DP-SGD machinery and the calibration of
sigma; it does not audit a generator's own model code beyond what the shared loop and the
preflight cover, the data pipeline, the label histogram, or anything released outside DP-SGD.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time

import numpy as np
import torch
from torch import nn

METHODS = ("tradeoff", "one_run")
VARIANTS = ("real", "no_noise", "no_clipping", "noise_third", "full_batch", "row_units")
UNITS = ("image", "subject")
NO_CLIP_NORM = 1e6  # "clipping disabled": far above any gradient norm in the audit
CANARY_LR = 1.0  # plain SGD on the canary head: an update is -lr * (noised clipped sum) / B
BALLAST_LR = 0.05  # the CNN on the real images (its weights are discarded)
SELECTION_FRACTION = 0.5  # of each of the in- and out-canaries, used to choose the threshold

__all__ = ["METHODS", "UNITS", "VARIANTS", "clopper_pearson", "claim_llr", "gdp_mu_lower", "gdp_epsilon",
           "eps_delta_lower", "p_value", "epsilon_lower_bound", "variant_plan", "run_audit", "format_audit"]


# ----------------------------------------------------------------------------- statistics


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """Exact one-sided Clopper-Pearson bounds for a binomial proportion from k of n.

    Returns (lo, hi) with P[lo > p] <= alpha and P[hi < p] <= alpha (each side at level alpha;
    both hold together with probability >= 1 - 2 alpha).
    """
    from scipy.stats import beta

    if not (0 <= k <= n and n >= 1):
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    lo = 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha, k + 1, n - k))
    return lo, hi


def claim_llr(increments: np.ndarray, sigma: float, sample_rate: float) -> np.ndarray:
    """Neyman-Pearson log-likelihood ratio of "in" vs "out" of normalised per-step increments.

    `increments` (..., T): a canary's coordinate moves per step in units of lr * C / B. Under
    the claim an "out" step is N(0, sigma^2), an "in" step the mixture
    (1 - q) N(0, sigma^2) + q N(1, sigma^2); the ratio of their densities is
    1 - q + q exp((2 d - 1) / (2 sigma^2)), and the statistic is the sum of its logs.
    """
    if not sigma > 0:
        raise ValueError(f"the claimed sigma must be > 0, got {sigma}")
    q = float(sample_rate)
    if not 0 < q <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {q}")
    d = np.asarray(increments, dtype=np.float64)
    z = (2.0 * d - 1.0) / (2.0 * sigma * sigma)
    per_step = z if q == 1.0 else np.logaddexp(math.log1p(-q), math.log(q) + z)
    return per_step.sum(axis=-1)


def gdp_mu_lower(tpr_lo: float, fpr_hi: float) -> float:
    """mu of the Gaussian trade-off curve through (FPR_hi, TPR_lo): Phi^-1(TPR) - Phi^-1(FPR), >= 0."""
    from scipy.stats import norm

    if tpr_lo <= 0.0 or fpr_hi >= 1.0:
        return 0.0
    if fpr_hi <= 0.0 or tpr_lo >= 1.0:
        return math.inf
    return max(0.0, float(norm.ppf(tpr_lo) - norm.ppf(fpr_hi)))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The epsilon at `delta` of a mu-GDP mechanism (Dong, Roth & Su 2019)."""
    from scipy.optimize import brentq

    from dpgen.privacy.accounting import _gdp_delta

    if not math.isfinite(mu):
        return math.inf
    if mu <= 0 or _gdp_delta(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while _gdp_delta(hi, mu) > delta:
        hi *= 2
        if hi > 1e4:
            return math.inf
    return float(brentq(lambda e: _gdp_delta(e, mu) - delta, 0.0, hi, xtol=1e-9))


def eps_delta_lower(tpr_lo: float, fpr_hi: float, delta: float) -> float:
    """The classic (epsilon, delta) lower bound from one (FPR, TPR) point (Kairouz et al. 2015):
    max(log((TPR - delta) / FPR), log((1 - delta - FPR) / (1 - TPR))), at least 0."""
    out = 0.0
    if tpr_lo - delta > 0:
        out = max(out, math.inf if fpr_hi <= 0 else math.log((tpr_lo - delta) / fpr_hi))
    if 1 - delta - fpr_hi > 0:
        out = max(out, math.inf if tpr_lo >= 1 else math.log((1 - delta - fpr_hi) / (1 - tpr_lo)))
    return out


def _binom_pmf(k: int, n: int, q: float) -> float:
    if k < 0 or k > n:
        return 0.0
    if q <= 0.0:
        return 1.0 if k == 0 else 0.0
    if q >= 1.0:
        return 1.0 if k == n else 0.0
    log = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(q) + (n - k) * math.log1p(-q)
    return math.exp(log)


def _binom_sf(v: int, n: int, q: float) -> float:
    """P[Binomial(n, q) >= v]."""
    if v <= 0:
        return 1.0
    from scipy.stats import binom

    return float(binom.sf(v - 1, n, q))


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P-value of `v` correct guesses out of `r` (m canaries) under (eps, delta)-DP.

    Steinke, Nasr & Jagielski 2023, Theorem 3.2: with q = e^eps / (1 + e^eps),
    P[W >= v] <= P[Binom(r, q) >= v] + 2 m delta max_{i >= 1} (1/i) P[v - i <= Binom(r, q) < v].
    """
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    if eps < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need eps >= 0 and 0 <= delta <= 1, got eps={eps}, delta={delta}")
    q = 1.0 / (1.0 + math.exp(-eps))
    beta = _binom_sf(v, r, q)
    alpha, acc = 0.0, 0.0
    for i in range(1, v + 1):  # beyond i = v the sum stops growing and 1/i shrinks
        acc += _binom_pmf(v - i, r, q)
        alpha = max(alpha, acc / i)
    return min(1.0, beta + 2.0 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """Largest eps that `v` correct guesses out of `r` reject at `confidence` (0 if none).

    The p-value grows with eps, so the rejected set is an interval [0, eps_lower); found by
    bisection to ~1e-9. A mechanism that really is (eps, delta)-DP gives a bound above eps
    with probability at most 1 - confidence.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < alpha:
        lo, hi = hi, hi * 2
        if hi > 1e4:  # v = r with delta = 0 and a huge r: the bound exceeds anything reportable
            return math.inf
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) < alpha:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-9:
            break
    return lo


# ----------------------------------------------------------------------------- the claim


def _claim_limit(event: dict, fpr: float, neighbouring: str) -> float:
    """1 - f_claim(fpr): the largest TPR any test can have at `fpr` against the claimed
    mechanism (certified upper bound, pessimistic PLD)."""
    from dpgen.privacy.bounds import rero_bound_events

    if fpr >= 1.0:
        return 1.0
    return float(rero_bound_events([event], max(fpr, 1e-12), neighbouring=neighbouring)["bound"])


@functools.lru_cache(maxsize=16)
def _claim_curve_grid(sigma: float, q: float, steps: int, neighbouring: str) -> tuple[np.ndarray, np.ndarray]:
    """1 - f_claim on a log grid of FPRs, from one coarse PLD: only to CHOOSE the threshold
    (the test itself calls `rero_bound_events` at its FPR bound)."""
    from dpgen.privacy.accounting import composed_pld

    pld = composed_pld([{"type": "poisson_gaussian", "sigma": sigma, "sample_rate": q, "steps": steps}], 1e-2,
                       neighbouring)
    eps = np.linspace(0.0, 25.0, 1001)
    deltas = np.asarray(pld.get_delta_for_epsilon(eps), dtype=np.float64)
    kappas = np.logspace(-6, 0, 241)
    tpr = np.minimum(1.0, (kappas[:, None] * np.exp(eps)[None, :] + deltas[None, :]).min(axis=1))
    return kappas, tpr


def _claim_curve(plan, fpr: np.ndarray) -> np.ndarray:
    kappas, tpr = _claim_curve_grid(plan.sigma, plan.sample_rate, plan.steps, plan.neighbouring)
    return np.interp(np.log(np.clip(fpr, kappas[0], 1.0)), np.log(kappas), tpr)


@functools.lru_cache(maxsize=32)
def _plan(epsilon: float, delta: float, n_units: int, batch_size: float, steps: int, max_grad_norm: float,
          noise_multiplicity: int, unit_kind: str):
    from dpgen.privacy.dpsgd import plan_dpsgd

    return plan_dpsgd(target_epsilon=epsilon, delta=delta, n_units=n_units, batch_size=batch_size, steps=steps,
                      max_grad_norm=max_grad_norm, noise_multiplicity=noise_multiplicity,
                      what="the audited DP-SGD mechanism", unit_kind=unit_kind)


def variant_plan(plan, variant: str, n_rows: int | None = None):
    """The plan the engine is handed for `variant` (the claim stays `plan`)."""
    if variant == "real":
        return plan
    if variant == "no_noise":
        return dataclasses.replace(plan, sigma=0.0)
    if variant == "noise_third":
        return dataclasses.replace(plan, sigma=plan.sigma / 3)
    if variant == "no_clipping":
        # Opacus' noise std is sigma * max_grad_norm: keep it at the claim's sigma * C while
        # the clipping threshold is out of reach of every gradient.
        return dataclasses.replace(plan, max_grad_norm=NO_CLIP_NORM, sigma=plan.sigma * plan.max_grad_norm / NO_CLIP_NORM)
    if variant == "full_batch":
        return dataclasses.replace(plan, sample_rate=1.0)
    if variant == "row_units":
        # every row its own unit (sampled and clipped alone), same q
        return dataclasses.replace(plan, n_units=n_rows)
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


# ----------------------------------------------------------------------------- model and objective


class AuditModel(nn.Module):
    """A small CNN classifier for the real images, plus a linear canary head.

    Canary rows feed A * e_i into `canary` (so their gradient is -A * e_i on that head alone);
    real rows feed zeros into it. The loss is chosen by row type, so a row's gradient never
    reaches the other part.
    """

    def __init__(self, m: int, image_shape: tuple[int, ...]):
        super().__init__()
        c = image_shape[0]
        self.features = nn.Sequential(  # 2x downsampling first: the real images are ballast, keep them cheap
            nn.AvgPool2d(2), nn.Conv2d(c, 8, 3, stride=2, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(8, 1)
        self.canary = nn.Linear(m, 1, bias=False)
        nn.init.zeros_(self.canary.weight)

    def forward(self, x: torch.Tensor, canary_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.classifier(self.features(x))[:, 0], self.canary(canary_in)[:, 0]


class CanaryObjective:
    """The audit's DP objective (the `DPObjective` protocol of `dpgen.privacy.dpsgd`).

    Rows: "x" (image; zeros for a canary row), "y" (label), "canary" (canary id, -1 for a real
    row). Each draw (K per row) adds a little noise to the real images and gives a canary row
    the magnitude A * (1 + u / 2), u ~ U(0, 1): draws differ, as diffusion draws do, and every
    canary gradient stays above the clipping norm.
    """

    def __init__(self, image_shape: tuple[int, ...], m: int, canary_norm: float, input_noise: float = 0.05):
        self.image_shape, self.m, self.canary_norm, self.input_noise = tuple(image_shape), m, canary_norm, input_noise

    def draw_rows(self, rows: dict, generator: torch.Generator) -> dict:
        canary = rows["canary"]
        is_canary = canary >= 0
        n = len(canary)
        magnitude = self.canary_norm * (1.0 + 0.5 * torch.rand(n, generator=generator))
        canary_in = torch.zeros(n, self.m)
        c_rows = torch.nonzero(is_canary).flatten()
        canary_in[c_rows, canary[c_rows]] = magnitude[c_rows]
        x = rows["x"] + self.input_noise * torch.randn(rows["x"].shape, generator=generator) * (
            ~is_canary).view(-1, *[1] * len(self.image_shape))
        return {"x": x, "y": rows["y"], "canary_in": canary_in, "is_canary": is_canary}

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        logit, canary_out = model(batch["x"], batch["canary_in"])
        real = nn.functional.binary_cross_entropy_with_logits(logit, batch["y"], reduction="none")
        # Canary row i: loss -A * w_i, gradient -A * e_i. torch.where sends zero gradient to the
        # branch not taken, so the two parts of the model never share a row's gradient.
        return torch.where(batch["is_canary"], -canary_out, real)

    def preflight_batch(self, n: int, generator: torch.Generator) -> dict:
        canary = torch.randint(0, self.m, (n,), generator=generator)
        canary[::2] = -1  # half real rows, half canary rows
        rows = {"x": torch.randn((n, *self.image_shape), generator=generator),
                "y": torch.rand(n, generator=generator).round(), "canary": canary}
        return self.draw_rows(rows, generator)


def _load_real_images(dataset: str, n_real: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    from dpgen.data import load_npz, resolve_source

    ds = load_npz(resolve_source(dataset), "train")
    if ds.spatial_dims != 2:
        raise ValueError(f"the audit model is 2D; {dataset} has {ds.spatial_dims}D images")
    ds = ds.subset(n_real)
    return ds.model_tensor().float(), torch.as_tensor(ds.labels).float().reshape(-1)


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class _Setup:
    included: np.ndarray  # (m,) bool: canary in the training data
    units: object  # PrivacyUnits of the claim
    rows: dict
    claim: object  # DPSGDPlan the accountant calibrated
    unit: str
    n_real: int  # real image rows


def _build(included: np.ndarray, x_real, y_real, unit: str, epsilon, delta, steps, sample_rate, max_grad_norm,
           noise_multiplicity) -> _Setup:
    from dpgen.privacy.engine import PrivacyUnits

    rows_per_unit = 2 if unit == "subject" else 1
    n_real = (len(x_real) // rows_per_unit) * rows_per_unit
    x_real, y_real = x_real[:n_real], y_real[:n_real]
    ids = np.flatnonzero(included)
    canary_of_row = np.repeat(ids, rows_per_unit)
    n_rows = n_real + len(canary_of_row)
    rows = {
        "x": torch.cat([x_real, torch.zeros((len(canary_of_row), *x_real.shape[1:]))]),
        "y": torch.cat([y_real, torch.zeros(len(canary_of_row))]),
        "canary": torch.cat([torch.full((n_real,), -1, dtype=torch.long), torch.as_tensor(canary_of_row)]),
    }
    if unit == "subject":  # real images in pairs, a canary's two rows one subject
        subjects = np.array([f"r{j // 2}" for j in range(n_real)] + [f"c{i}" for i in canary_of_row])
        units = PrivacyUnits.from_subjects(subjects, n_rows)
    else:
        units = PrivacyUnits.from_subjects(None, n_rows)
    n_units = len(units)
    claim = _plan(float(epsilon), float(delta), n_units, float(sample_rate) * n_units, int(steps),
                  float(max_grad_norm), int(noise_multiplicity), unit)
    return _Setup(included=included, units=units, rows=rows, claim=claim, unit=unit, n_real=n_real)


def _train(setup: _Setup, variant: str, m: int, canary_norm: float, seed: int, physical_batch_size: int,
           grad_sample_mode: str) -> tuple[np.ndarray, dict]:
    """Train through the one DP-SGD loop; returns the canary head after every step, (T + 1, m)."""
    from dpgen.privacy import dpsgd
    from dpgen.privacy.engine import PrivacyUnits
    from dpgen.privacy.randomness import fresh_secret_streams

    claim = setup.claim
    units = setup.units
    n_rows = len(setup.rows["canary"])
    if variant == "row_units":
        units = PrivacyUnits.from_subjects(None, n_rows)
    plan = variant_plan(claim, variant, n_rows)
    torch.manual_seed(seed)
    model = AuditModel(m, tuple(setup.rows["x"].shape[1:]))
    head = [model.canary.weight]
    rest = [p for n, p in model.named_parameters() if not n.startswith("canary.")]
    opt = torch.optim.SGD([{"params": head, "lr": CANARY_LR}, {"params": rest, "lr": BALLAST_LR}])
    objective = CanaryObjective(tuple(setup.rows["x"].shape[1:]), m, canary_norm)
    # Looked up at run time, so that the audit runs whatever dpgen.privacy.dpsgd ships.
    loop = dpsgd.DPSGDLoop(model, opt, objective, setup.rows, units, plan, fresh_secret_streams("audit:"),
                           physical_batch_size=physical_batch_size, grad_sample_mode=grad_sample_mode,
                           preflight_seed=seed)
    trajectory = np.empty((plan.steps + 1, m), dtype=np.float64)
    trajectory[0] = model.canary.weight.detach()[0].double().numpy()
    for step in range(plan.steps):
        loop.step(step)  # its StepStats (how many units were sampled) is secret: not read
        trajectory[step + 1] = model.canary.weight.detach()[0].double().numpy()
    loop.close()
    if not np.isfinite(trajectory).all():
        raise RuntimeError("the audit's canary coordinates are not finite")
    info = {"engine_sigma": plan.sigma, "engine_max_grad_norm": plan.max_grad_norm,
            "engine_sample_rate": plan.sample_rate, "engine_units": len(units),
            "preflight_max_error": loop.preflight_report.max_relative_error}
    return trajectory, info


@contextlib.contextmanager
def _torch_threads(n: int | None):
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_audit(
    variant: str = "real",
    epsilon: float = 10.0,
    delta: float = 1e-5,
    m: int = 1000,
    steps: int = 40,
    seed: int = 0,
    *,
    method: str = "tradeoff",
    sample_rate: float = 0.25,
    unit: str = "image",
    guesses: int = 100,
    max_grad_norm: float = 1.0,
    canary_norm: float = 100.0,
    noise_multiplicity: int = 1,
    physical_batch_size: int = 256,
    grad_sample_mode: str = "hooks",
    confidence: float = 0.99,
    dataset: str = "breastmnist",
    n_real: int | None = 128,
    real_images: tuple[torch.Tensor, torch.Tensor] | None = None,
    threads: int | None = 1,
) -> dict:
    """Audit the DP-SGD loop against the claim `epsilon` (sigma calibrated by `plan_dpsgd`).

    `method`: "tradeoff" (default; see the module docstring) or "one_run" (Steinke et al.;
    `guesses` canaries guessed in and as many out, fixed before the run). `variant`: the plan
    the engine is handed (the claim never changes). `unit`: "image" or "subject" (2 rows per
    subject, canaries included). `real_images` = (images in [-1, 1], labels) overrides
    `dataset` / `n_real`. `threads`: torch intra-op threads during the run (None: as is); one is
    the default because the model is tiny and more threads only spin on a shared machine.

    Returns a JSON-able dict; "verdict" is PASS, FAIL (evidence that the engine leaks more than
    the claim) or INCONCLUSIVE (the audit cannot show a violation of this claim at all).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    if variant == "row_units" and unit != "subject":
        raise ValueError("variant row_units breaks subject units: use it with unit 'subject'")
    if not math.isfinite(epsilon) or epsilon <= 0:
        raise ValueError(f"the claimed epsilon must be finite and > 0 (an infinite epsilon claims nothing), got {epsilon}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not 0 < sample_rate < 1:
        raise ValueError(f"sample_rate must be in (0, 1) (the claim is about Poisson subsampling), got {sample_rate}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if noise_multiplicity < 1:
        raise ValueError(f"noise_multiplicity must be >= 1, got {noise_multiplicity}")
    if canary_norm <= max_grad_norm:
        raise ValueError("canary_norm must exceed max_grad_norm (the no_clipping variant needs unclipped canaries)")
    if method == "tradeoff" and m < 8:
        raise ValueError(f"the trade-off audit needs at least 8 canaries, got m={m}")
    if method == "one_run" and (guesses < 1 or 2 * guesses > m):
        raise ValueError(f"need 1 <= guesses and 2 * guesses <= m, got guesses={guesses}, m={m}")
    with _torch_threads(threads):
        t0 = time.perf_counter()
        x_real, y_real = real_images if real_images is not None else _load_real_images(dataset, n_real)
        x_real, y_real = x_real.float(), y_real.float().reshape(-1)
        rng = np.random.default_rng([seed, 1])  # the auditor's public randomness
        if method == "one_run":
            included = rng.random(m) < 0.5  # a fair coin each (Steinke et al.)
        else:
            included = np.zeros(m, dtype=bool)
            included[rng.permutation(m)[: m // 2]] = True
        setup = _build(included, x_real, y_real, unit, epsilon, delta, steps, sample_rate, max_grad_norm,
                       noise_multiplicity)
        head = _head(setup, variant, method, m, confidence, guesses, delta)
        power = _tradeoff_power(setup, head, confidence) if method == "tradeoff" else _one_run_power(head, guesses)
        trajectory, engine = _train(setup, variant, m, canary_norm, seed, physical_batch_size, grad_sample_mode)
        if method == "tradeoff":
            result = _tradeoff_analysis(setup, trajectory, head, power, confidence, rng)
        else:
            result = _one_run_analysis(setup, trajectory, head, power, confidence, guesses, seed)
        result.update(engine=engine, grad_sample_mode=grad_sample_mode, noise_multiplicity=noise_multiplicity,
                      canary_norm=canary_norm, n_real=setup.n_real,
                      dataset=dataset if real_images is None else "given", seed=seed,
                      seconds=time.perf_counter() - t0)
        return result


def _head(setup: _Setup, variant, method, m, confidence, guesses, delta) -> dict:
    c = setup.claim
    return {
        "method": method, "variant": variant, "unit": f"per {setup.unit}", "m": m,
        "n_canaries_in": int(setup.included.sum()), "claimed_epsilon": c.epsilon_pld, "delta": delta,
        "sigma": c.sigma, "q": c.sample_rate, "steps": c.steps, "max_grad_norm": c.max_grad_norm,
        "expected_batch_size": c.expected_batch_size, "n_units": c.n_units, "neighbouring": c.neighbouring,
        "confidence": confidence,
    }


def _split(included: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Selection / evaluation masks: SELECTION_FRACTION of the in- and of the out-canaries select."""
    sel = np.zeros(len(included), dtype=bool)
    for group in (np.flatnonzero(included), np.flatnonzero(~included)):
        pick = rng.permutation(group)[: int(round(SELECTION_FRACTION * len(group)))]
        sel[pick] = True
    return sel, ~sel


def _tradeoff_power(setup: _Setup, head: dict, confidence: float) -> dict:
    """What a perfect attack on the evaluation canaries could show (before training)."""
    n_in = int(setup.included.sum())
    n_out = len(setup.included) - n_in
    n1 = n_in - int(round(SELECTION_FRACTION * n_in))
    n0 = n_out - int(round(SELECTION_FRACTION * n_out))
    a = (1 - confidence) / 2
    tpr_lo, fpr_hi = clopper_pearson(n1, n1, a)[0], clopper_pearson(0, n0, a)[1]
    limit = _claim_limit(setup.claim.event(), fpr_hi, setup.claim.neighbouring)
    mu = gdp_mu_lower(tpr_lo, fpr_hi)
    return {"can_fail": bool(tpr_lo > limit), "n_eval_in": n1, "n_eval_out": n0, "perfect_tpr_lo": tpr_lo,
            "perfect_fpr_hi": fpr_hi, "claim_tpr_at_perfect_fpr": limit, "max_gdp_mu": mu,
            "max_gdp_epsilon": gdp_epsilon(mu, head["delta"]),
            "max_eps_delta_epsilon": eps_delta_lower(tpr_lo, fpr_hi, head["delta"])}


def _tradeoff_analysis(setup: _Setup, trajectory: np.ndarray, head: dict, power: dict, confidence: float,
                       rng: np.random.Generator) -> dict:
    c = setup.claim
    increments = np.diff(trajectory, axis=0).T * c.expected_batch_size / (CANARY_LR * c.max_grad_norm)  # (m, T)
    scores = claim_llr(increments, c.sigma, c.sample_rate)
    sel, ev = _split(setup.included, rng)
    inc = setup.included
    n1, n0 = int((ev & inc).sum()), int((ev & ~inc).sum())
    a = (1 - confidence) / 2

    # 1. the threshold, from the selection canaries only
    s_in, s_out = scores[sel & inc], scores[sel & ~inc]
    values = np.unique(np.concatenate([s_in, s_out]))
    taus = np.concatenate([[values[0] - 1.0], (values[1:] + values[:-1]) / 2, [values[-1] + 1.0]])
    tpr = (s_in[None, :] > taus[:, None]).mean(axis=1)
    fpr = (s_out[None, :] > taus[:, None]).mean(axis=1)
    from scipy.stats import beta, norm

    k1, k0 = np.round(tpr * n1), np.round(fpr * n0)
    t_lo = np.where(k1 > 0, beta.ppf(a, np.maximum(k1, 1), n1 - k1 + 1), 0.0)
    f_hi = np.where(k0 < n0, beta.ppf(1 - a, k0 + 1, np.maximum(n0 - k0, 1)), 1.0)
    # The margin in probit units (a Gaussian-DP-like distance above the claimed curve):
    # on the plain TPR scale the everything-is-in threshold is the one closest to the curve
    # for an engine that keeps its claim, which would make its report say nothing.
    with np.errstate(divide="ignore"):
        predicted = norm.ppf(t_lo) - norm.ppf(_claim_curve(c, f_hi))
    j = int(np.argmax(np.nan_to_num(predicted, nan=-np.inf)))
    tau = float(taus[j])

    # 2. one test on the evaluation canaries
    k1 = int((scores[ev & inc] > tau).sum())
    k0 = int((scores[ev & ~inc] > tau).sum())
    tpr_lo = clopper_pearson(k1, n1, a)[0]
    fpr_hi = clopper_pearson(k0, n0, a)[1]
    limit = _claim_limit(c.event(), fpr_hi, c.neighbouring)
    violation = tpr_lo > limit
    mu = gdp_mu_lower(tpr_lo, fpr_hi)
    verdict = "FAIL" if violation else ("PASS" if power["can_fail"] else "INCONCLUSIVE")
    from dpgen.privacy.bounds import gdp_mu

    return {
        **head, "verdict": verdict, "passed": verdict == "PASS", "violation": bool(violation), **power,
        "threshold": tau, "selection_predicted_margin": float(predicted[j]),
        "n_selection": int(sel.sum()), "eval_in_above": k1, "eval_out_above": k0,
        "tpr": k1 / n1, "fpr": k0 / n0, "tpr_lo": tpr_lo, "fpr_hi": fpr_hi, "claim_tpr_limit": limit,
        "margin": tpr_lo - limit, "gdp_mu_lower": mu, "gdp_epsilon_lower": gdp_epsilon(mu, head["delta"]),
        "claimed_gdp_mu_clt": gdp_mu(c.sigma, c.sample_rate, c.steps),
        "eps_lower": eps_delta_lower(tpr_lo, fpr_hi, head["delta"]),
        # A check of the model the statistic assumes (for information; under the claim an
        # out-canary step is N(0, sigma^2) and an in-canary step has mean q, std sqrt(sigma^2 + q(1-q))).
        "step_out_mean": float(increments[~inc].mean()), "step_out_std": float(increments[~inc].std()),
        "step_in_mean": float(increments[inc].mean()), "step_in_std": float(increments[inc].std()),
    }


def _one_run_power(head: dict, guesses: int) -> dict:
    """The largest lower bound the one-run method can give (all 2 * guesses guesses right)."""
    r = 2 * guesses
    best = epsilon_lower_bound(head["m"], r, r, head["delta"], head["confidence"])
    return {"can_fail": bool(best > head["claimed_epsilon"]), "max_certifiable_epsilon": best, "r": r}


def _one_run_analysis(setup: _Setup, trajectory: np.ndarray, head: dict, power: dict, confidence: float,
                      guesses: int, seed: int) -> dict:
    m, r = head["m"], power["r"]
    scores = trajectory[-1] - trajectory[0]
    # Rank by score; ties (e.g. exact zeros without noise) broken by a seeded random order.
    tie = np.random.default_rng([seed, 2]).permutation(m)
    order = np.lexsort((tie, scores))  # ascending score
    guess_out, guess_in = order[:guesses], order[m - guesses:]
    inc = setup.included
    v = int(inc[guess_in].sum() + (~inc[guess_out]).sum())
    eps_lower = epsilon_lower_bound(m, r, v, head["delta"], confidence)
    violation = eps_lower > head["claimed_epsilon"]
    verdict = "FAIL" if violation else ("PASS" if power["can_fail"] else "INCONCLUSIVE")
    return {**head, "verdict": verdict, "passed": verdict == "PASS", "violation": bool(violation), **power,
            "eps_lower": eps_lower, "v": v}


# ----------------------------------------------------------------------------- output


_VERDICT_LINE = {
    "PASS": "no violation detected (this audit could have shown one)",
    "FAIL": "VIOLATION: the training leaks more than the claimed mechanism allows",
    "INCONCLUSIVE": "this audit cannot fail at this claim: a PASS would be no evidence",
}


def format_audit(result: dict) -> str:
    r = result
    claim = (f"  claimed: epsilon = {r['claimed_epsilon']:.4f} at delta = {r['delta']:g}, {r['neighbouring']} "
             f"neighbours, {r['unit']} (sigma = {r['sigma']:.4g}, q = {r['q']:.4g}, T = {r['steps']}, "
             f"C = {r['max_grad_norm']:g}, PLD)")
    if r["method"] == "one_run":
        lines = [
            f"privacy audit (one-run, Steinke, Nasr & Jagielski 2023), variant {r['variant']!r}: {r['verdict']}",
            claim,
            f"  what it can certify: with m = {r['m']} canaries and r = {r['r']} guesses the largest lower bound "
            f"possible is epsilon {r['max_certifiable_epsilon']:.3f} at {100 * r['confidence']:g}% confidence; "
            + (f"it cannot certify a violation of a claim above {r['max_certifiable_epsilon']:.3f}"
               if not r["can_fail"] else "enough to refute this claim"),
            f"  observed: {r['v']} correct guesses of {r['r']} -> epsilon >= {r['eps_lower']:.4f}",
        ]
    else:
        lines = [
            f"privacy audit (trade-off curve test, every step observed), variant {r['variant']!r}: {r['verdict']}",
            claim,
            f"  what it can certify: {r['n_eval_in']} in- and {r['n_eval_out']} out-canaries are tested; a perfect "
            f"attack would show TPR >= {r['perfect_tpr_lo']:.4f} at FPR <= {r['perfect_fpr_hi']:.4f}, where the "
            f"claim allows TPR <= {r['claim_tpr_at_perfect_fpr']:.4f}: "
            + ("a violation of this claim can be shown" if r["can_fail"] else
               "even a perfect attack could not show a violation of this claim")
            + f" (at most GDP mu {r['max_gdp_mu']:.3g}, i.e. epsilon {r['max_gdp_epsilon']:.3g}; "
              f"(epsilon, delta) bound at most {r['max_eps_delta_epsilon']:.3g})",
            f"  observed: TPR >= {r['tpr_lo']:.4f} at FPR <= {r['fpr_hi']:.4f} ({r['eval_in_above']}/{r['n_eval_in']} "
            f"in, {r['eval_out_above']}/{r['n_eval_out']} out above the threshold chosen on {r['n_selection']} other "
            f"canaries); the claim allows TPR <= {r['claim_tpr_limit']:.4f} there",
            f"  canary steps (in units of C / B): out mean {r['step_out_mean']:.3g} std {r['step_out_std']:.3g}, in "
            f"mean {r['step_in_mean']:.3g}; the claim: out mean 0 std {r['sigma']:.3g}, in mean {r['q']:.3g}",
            f"  for information: GDP mu >= {r['gdp_mu_lower']:.3g} (epsilon {r['gdp_epsilon_lower']:.3g} at delta; "
            f"the claim's CLT mu is {r['claimed_gdp_mu_clt']:.3g}), (epsilon, delta) lower bound "
            f"{r['eps_lower']:.3g}",
        ]
    lines.append(f"  {_VERDICT_LINE[r['verdict']]} ({100 * r['confidence']:g}% confidence)")
    return "\n".join(lines)
