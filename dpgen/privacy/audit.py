"""An empirical privacy audit of the DP-SGD code path that can fail.

What it does
------------
One-run auditing (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023). `m` canaries are made; each is put into the training set independently with
probability 1/2, next to real images. One small model is trained through dpgen's *own* DP-SGD
engine (`dpgen.privacy.engine`: Poisson sampling of privacy units, Opacus per-sample gradients,
per-unit folding, clipping, seeded Gaussian noise, `DPSGD.step`) with the noise multiplier
that `accounting.calibrate_sigma` gives for the claimed epsilon. The auditor then looks at the
trained weights, guesses "in" for the `k` highest-scoring canaries and "out" for the `k`
lowest, and counts the correct guesses `v` out of `r = 2k`. Under (eps, delta)-DP the number
of correct guesses is (nearly) dominated by Binomial(r, e^eps / (1 + e^eps)); an observed `v`
too large for that is evidence against the claim. `epsilon_lower_bound` turns `v` into the
largest eps that is rejected at the given confidence (Steinke et al., Theorem 3.2 with the
delta term): with probability >= 95% over the run, a mechanism that really is (eps, delta)-DP
yields a lower bound <= eps.

The canaries are white-box "Dirac" gradient canaries: canary i only touches coordinate i of a
dedicated linear head (its per-sample gradient is -A * e_i, A = `canary_norm`), real images
only touch a small CNN classifier. A canary's score is how far its coordinate moved. This is
the strongest attack the threat model of DP-SGD allows (the adversary sees the final weights
and chooses the gradients), so the audit is as sensitive as a one-run audit can be.

Variants (the same canaries, seeds and claimed epsilon):
- "real": the engine as shipped. The lower bound must stay below the claim.
- "no_noise": noise multiplier 0 while still claiming the calibrated epsilon.
- "no_clipping": per-sample clipping effectively off (max_grad_norm 1e6) with the noise still
  calibrated to the nominal clipping norm: canary gradients of norm A > C go through unclipped.
The broken variants must produce a lower bound *above* the claim; that is what shows the audit
can fail (tests/test_audit.py asserts both directions).

What it shows and what it does not
----------------------------------
It checks that the DP-SGD machinery dpgen trains with (sampling, per-sample gradients,
clipping, noise, and the sigma the accountant calibrates) does not leak more than claimed, on
a small model where the strongest attack is available. It is a *lower* bound: passing does not
prove the claim (a one-run audit with m canaries cannot certify more than a few units of
epsilon, and subsampling amplification is invisible to it). It does not audit the diffusion
model itself, the data pipeline, the label histogram, the accountant's arithmetic beyond what
the canaries can see, or anything released outside the DP fine-tune.

The real images only train the classifier part, whose weights are discarded; the output (the
canary scores and the bound) depends on the canary coordinates alone, which per-sample clipping
keeps independent of the real images.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time

import numpy as np
import torch
from torch import nn

VARIANTS = ("real", "no_noise", "no_clipping")
NO_CLIP_NORM = 1e6  # "clipping disabled": far above any gradient norm in the audit

__all__ = ["VARIANTS", "p_value", "epsilon_lower_bound", "run_audit", "format_audit"]


# ----------------------------------------------------------------------------- statistics


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


# ----------------------------------------------------------------------------- the audited model


class AuditModel(nn.Module):
    """A small CNN classifier for the real images, plus a linear canary head.

    Canary rows feed A * e_i into `canary` (so their gradient is -A * e_i on that head alone);
    real rows feed zeros into it. The loss is masked by row type, so a row's gradient never
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


def _loss(model: nn.Module, batch: dict) -> torch.Tensor:
    logit, canary_out = model(batch["x"], batch["canary_in"])
    real = nn.functional.binary_cross_entropy_with_logits(logit, batch["y"], reduction="none")
    # Canary row i: loss -A * w_i, gradient -A * e_i. torch.where sends zero gradient to the
    # branch not taken, so the two parts of the model never share a row's gradient.
    return torch.where(batch["is_canary"], -canary_out, real)


def _load_real_images(dataset: str, n_real: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    from dpgen.data import load_npz, resolve_source

    ds = load_npz(resolve_source(dataset), "train")
    if ds.spatial_dims != 2:
        raise ValueError(f"the audit model is 2D; {dataset} has {ds.spatial_dims}D images")
    ds = ds.subset(n_real)
    return ds.model_tensor().float(), torch.as_tensor(ds.labels)


@functools.lru_cache(maxsize=32)
def _calibrate(epsilon: float, delta: float, q: float, steps: int) -> tuple[float, float]:
    from dpgen.privacy import accounting

    sigma = accounting.calibrate_sigma(epsilon, delta, q, steps)
    claimed = accounting.epsilon([accounting.poisson_gaussian_event(sigma, q, steps)], delta, "pld")
    return sigma, claimed


def run_audit(
    variant: str = "real",
    epsilon: float = 2.0,
    delta: float = 1e-5,
    m: int = 1000,
    steps: int = 40,
    seed: int = 0,
    *,
    sample_rate: float = 0.25,
    guesses: int = 100,
    max_grad_norm: float = 1.0,
    canary_norm: float = 100.0,
    noise_multiplicity: int = 1,
    physical_batch_size: int = 256,
    grad_sample_mode: str = "hooks",
    confidence: float = 0.95,
    dataset: str = "breastmnist",
    n_real: int | None = None,
    real_images: tuple[torch.Tensor, torch.Tensor] | None = None,
    threads: int | None = 1,
) -> dict:
    """Train with canaries through the DP-SGD engine and return the empirical lower bound.

    `guesses` canaries are guessed "in" (highest scores) and as many "out" (lowest), so
    r = 2 * guesses; it is fixed before the run (choosing it after seeing the scores would
    void the confidence level). `real_images` = (images in [-1, 1], labels) overrides
    `dataset`/`n_real`. `threads`: torch intra-op threads during the run (None: leave as is).
    One thread is the default because the model is tiny: on a shared 2-core machine two
    threads made the audit 5-20x slower (OpenMP threads spinning against other jobs), never
    faster.
    """
    with _torch_threads(threads):
        return _run_audit(variant, epsilon, delta, m, steps, seed, sample_rate, guesses, max_grad_norm, canary_norm,
                          noise_multiplicity, physical_batch_size, grad_sample_mode, confidence, dataset, n_real,
                          real_images)


@contextlib.contextmanager
def _torch_threads(n: int | None):
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_audit(variant, epsilon, delta, m, steps, seed, sample_rate, guesses, max_grad_norm, canary_norm,
               noise_multiplicity, physical_batch_size, grad_sample_mode, confidence, dataset, n_real,
               real_images) -> dict:
    from dpgen.privacy.engine import DPSGD, PrivacyUnits, preflight, require_preflight, step_generator

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if not 1 <= guesses or 2 * guesses > m:
        raise ValueError(f"need 1 <= guesses and 2 * guesses <= m, got guesses={guesses}, m={m}")
    if canary_norm <= max_grad_norm:
        raise ValueError("canary_norm must exceed max_grad_norm (the no_clipping variant needs unclipped canaries)")
    t0 = time.perf_counter()
    sigma, claimed = _calibrate(float(epsilon), float(delta), float(sample_rate), int(steps))

    x_real, y_real = real_images if real_images is not None else _load_real_images(dataset, n_real)
    x_real, y_real = x_real.float(), y_real.float()
    n_real_rows = len(x_real)

    # Which canaries are in: a fair coin each, from the audit seed (the auditor knows it).
    rng = np.random.default_rng([seed, 1])
    included = rng.random(m) < 0.5
    canary_ids = np.flatnonzero(included)
    n_rows = n_real_rows + len(canary_ids)
    # Row j < n_real is real image j; row n_real + t is canary canary_ids[t].
    units = PrivacyUnits.from_subjects(None, n_rows)
    q = float(sample_rate)
    expected = q * len(units)

    torch.manual_seed(seed)
    model = AuditModel(m, tuple(x_real.shape[1:]))
    w0 = model.canary.weight.detach().clone()[0]
    noise_multiplier, clip = sigma, max_grad_norm
    if variant == "no_noise":
        noise_multiplier = 0.0
    elif variant == "no_clipping":
        # Opacus' noise std is noise_multiplier * max_grad_norm: keep it at sigma * C while
        # the clipping threshold is out of reach.
        clip = NO_CLIP_NORM
        noise_multiplier = sigma * max_grad_norm / NO_CLIP_NORM
    # The same per-sample-gradient preflight as every DP-SGD run, in the mode the audit trains
    # in, on random rows (half canaries): an audit of wrong per-sample gradients proves nothing.
    g = step_generator(seed, 0, "audit-preflight")
    is_canary = torch.arange(4) % 2 == 1
    require_preflight(preflight(model, _loss, {
        "x": torch.randn((4, *x_real.shape[1:]), generator=g), "y": torch.rand(4, generator=g).round(),
        "canary_in": torch.randn((4, m), generator=g) * is_canary.view(-1, 1), "is_canary": is_canary,
    }, mode=grad_sample_mode))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dp = DPSGD(model, opt, noise_multiplier=noise_multiplier, max_grad_norm=clip, expected_batch_size=expected,
               grad_sample_mode=grad_sample_mode)

    zeros_img = torch.zeros((1, *x_real.shape[1:]))

    def make_batch_for(step: int):
        def make_batch(chunk: int, rows: np.ndarray, k: int) -> dict:
            rows_t = torch.as_tensor(rows)
            is_canary = rows_t >= n_real_rows
            real_idx = torch.where(is_canary, 0, rows_t)
            x = torch.where(is_canary.view(-1, 1, 1, 1), zeros_img, x_real[real_idx])
            y = torch.where(is_canary, 0.0, y_real[real_idx])
            canary_in = torch.zeros(len(rows), m)
            c_rows = torch.nonzero(is_canary).flatten()
            if len(c_rows):
                ids = torch.as_tensor(canary_ids)[rows_t[c_rows] - n_real_rows]
                canary_in[c_rows, ids] = canary_norm
            # A little input noise per draw, so K > 1 draws differ as diffusion draws do.
            g = step_generator(seed, step, f"audit-draw:{chunk}:{k}")
            x = x + 0.05 * torch.randn(x.shape, generator=g) * (~is_canary).view(-1, 1, 1, 1)
            return {"x": x, "y": y, "canary_in": canary_in, "is_canary": is_canary}

        return make_batch

    # The noise seed derives from the audit seed for reproducibility; the auditor never uses it
    # (scores are read from the weights alone).
    for step in range(steps):
        chosen = units.poisson_sample(q, step_generator(seed, step, "audit-poisson"))
        chunks = units.physical_chunks(chosen, physical_batch_size)
        dp.step(chunks, make_batch_for(step), _loss, noise_multiplicity, step_generator(seed, step, "audit-noise"))
    model = dp.close()
    scores = (model.canary.weight.detach()[0] - w0).double().numpy()

    # Rank by score; ties (e.g. exact zeros without noise) broken by a seeded random order.
    tie = np.random.default_rng([seed, 2]).permutation(m)
    order = np.lexsort((tie, scores))  # ascending score
    guess_out, guess_in = order[:guesses], order[m - guesses:]
    v = int(included[guess_in].sum() + (~included[guess_out]).sum())
    r = 2 * guesses
    eps_lower = epsilon_lower_bound(m, r, v, delta, confidence)
    return {
        "variant": variant, "claimed_epsilon": claimed, "target_epsilon": float(epsilon), "eps_lower": eps_lower,
        "passed": bool(eps_lower <= claimed), "confidence": confidence, "delta": delta, "m": m, "r": r, "v": v,
        "sigma": sigma, "noise_multiplier_used": noise_multiplier, "max_grad_norm_used": clip,
        "nominal_max_grad_norm": max_grad_norm, "canary_norm": canary_norm, "q": q, "steps": steps,
        "noise_multiplicity": noise_multiplicity, "n_real": n_real_rows, "n_canaries_in": int(included.sum()),
        "grad_sample_mode": grad_sample_mode, "seed": seed, "dataset": dataset if real_images is None else "given",
        "seconds": time.perf_counter() - t0,
    }


def format_audit(result: dict) -> str:
    verdict = "PASS" if result["passed"] else "FAIL"
    return "\n".join([
        f"privacy audit (one-run, Steinke et al. 2023), variant {result['variant']!r}: {verdict}",
        f"  claimed epsilon      = {result['claimed_epsilon']:.4f} at delta = {result['delta']:g} "
        f"(sigma = {result['sigma']:.4g}, q = {result['q']:g}, T = {result['steps']}, PLD)",
        f"  empirical lower bound = {result['eps_lower']:.4f} at {100 * result['confidence']:g}% confidence",
        f"  guesses: {result['v']} correct of r = {result['r']} on m = {result['m']} canaries "
        f"({result['n_canaries_in']} in, {result['n_real']} real images)",
        "  " + ("the lower bound is below the claim: no violation detected" if result["passed"] else
                "the lower bound EXCEEDS the claim: the training leaks more than the accountant says"),
    ])
