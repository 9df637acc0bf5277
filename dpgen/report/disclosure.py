"""What anything meant to leave the institution may say about a run's privacy.

One home for the rule, used by the dataset card of a release bundle and by the shareable
report (report/report.html): they hold only DP outputs, post-processing of them, public data
and user choices. The data holder's internal review (internal/review/review.html) says more.

The number of private units N is private under the default neighbouring relation
("add_remove": the guarantee assumes N is secret; releasing N would itself distinguish the
neighbouring data sets). So with "add_remove" nothing shared states N or a quantity that N
follows from: not the sample rate q (= expected batch / N), not sigma (calibrated from q, so
it reveals q), not the exact spent epsilon (the calibration makes it a function of q), and no
mechanism-specific bound (they need sigma and q). What is stated is the budget, which the
accountant guarantees the composed epsilon does not exceed, for the add/remove relation; the
user's choices (steps, expected batch, clipping norm, noise draws); the DP releases; and the
limits that follow from (epsilon, delta) alone.

With "replace_one" (a config choice: the data holder treats N as public), the card states N,
q, sigma and the exact epsilon for replace-one neighbours, the add/remove figure of the same
events beside it, and the mechanism-specific limits of the composition of every mechanism.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from dpgen.privacy import mechanisms
from dpgen.privacy.schema import PlanEntry
from dpgen.privacy.bounds import eps_delta_auc_limit, eps_delta_tpr_limit
from dpgen.report.runinfo import RunInfo, fmt_num

FPRS = (0.01, 0.001)

_WHAT = {
    mechanisms.FINETUNE: "DP-SGD fine-tuning of the generator",
    mechanisms.AUTOENCODER: "DP-SGD fine-tuning of the latent autoencoder",
    mechanisms.LABEL_HISTOGRAM: "Gaussian mechanism on the label histogram (class counts of the cohort)",
    mechanisms.ATTRIBUTE_HISTOGRAM: "Gaussian mechanism on the attribute histograms",
}


@dataclass
class SharedMechanism:
    name: str
    what: str
    steps: int | None = None  # DP-SGD: the user's choices
    expected_batch_size: float | None = None
    max_grad_norm: float | None = None
    noise_multiplicity: int | None = None
    noise_std: float | None = None  # a DP release: the user's noise std (its sensitivity is fixed)
    values: list | None = None  # a DP release's noisy values
    sigma: float | None = None  # replace_one only (N public)
    sample_rate: float | None = None  # replace_one only (N public)


@dataclass
class SharedPrivacy:
    """The privacy statement of a shareable output."""

    neighbouring: str
    epsilon: float | None  # the stated guarantee: the budget (add_remove) or the exact figure (replace_one)
    epsilon_kind: str
    delta: float | None
    unit: str
    meaning: str
    covers: list[str]
    does_not_cover: list[str]
    mechanisms: list[SharedMechanism] = field(default_factory=list)
    limits: dict = field(default_factory=dict)  # from (epsilon, delta) alone
    n_units: int | None = None  # replace_one only
    epsilon_add_remove: float | None = None  # replace_one only: the same events, add/remove neighbours
    mechanism_limits: dict | None = None  # replace_one only: reconstruction and TPR limits of the composition
    not_stated: str | None = None  # add_remove: what is withheld, and why

    def to_dict(self) -> dict:
        return asdict(self)


def _unit_words(unit: str) -> str:
    return unit.removeprefix("per ") if unit.startswith("per ") else "unit"


def _mechanism(name: str, plan: PlanEntry | None, info: RunInfo, disclose_n: bool) -> SharedMechanism:
    m = SharedMechanism(name=name, what=_WHAT.get(name, name))
    if plan is not None:
        m.steps, m.expected_batch_size = plan.planned_steps, plan.expected_batch_size
        m.max_grad_norm, m.noise_multiplicity = plan.max_grad_norm, plan.noise_multiplicity
        if disclose_n:
            m.sigma, m.sample_rate = plan.sigma, plan.sample_rate
    release = info.latest("dp_release", name=name)
    if release is not None:
        m.values = release.get("values")
        if name == mechanisms.LABEL_HISTOGRAM:
            m.noise_std = release["event"]["sigma"]
        elif name == mechanisms.ATTRIBUTE_HISTOGRAM and info.config is not None:
            m.noise_std = info.config.sample.attributes.histogram_sigma
    return m


def shared_privacy(info: RunInfo) -> SharedPrivacy:
    """The privacy facts any shareable output of this run may state (see the module docstring)."""
    s = info.privacy
    if s is None:
        return SharedPrivacy(neighbouring=info.neighbouring, epsilon=None, epsilon_kind="none", delta=info.delta,
                             unit="unknown", meaning="no privacy accounting could be read", covers=[],
                             does_not_cover=[])
    disclose_n = s.neighbouring == "replace_one"
    unit = s.unit or "per unit"
    u = _unit_words(unit)
    names = s.release_mechanisms
    plans = info.plans
    shared = [_mechanism(n, plans.get(n), info, disclose_n) for n in names]
    covers = ["every file of this bundle: the synthetic images and labels (and the generator's weights when "
              "included), which are computed from the DP mechanisms below and public randomness",
              f"each {u} of the private TRAINING split, for {'replace-one' if disclose_n else 'add/remove'} "
              f"neighbours: {'replacing' if disclose_n else 'adding or removing'} one {u}"]
    if unit == "per image":
        covers.append("per image: a patient with k images in the private data is protected at about k·ε")
    not_covered = [
        "the public pretraining data, which the generator may reproduce",
        "the private validation and test splits: nothing in this bundle was computed from them (they were used "
        "only in the data holder's internal review)",
        "what the data holder's internal review reports (fidelity, utility, privacy probes): those numbers are "
        "computed on private data without DP and are not part of anything shared",
    ]
    budget, delta = s.target_epsilon, s.delta
    if s.non_private:
        eps, kind, meaning = math.inf, "non-private", "NOT differentially private: a mechanism ran without noise"
    elif disclose_n:
        eps, kind = s.epsilon, "exact (PLD accountant, replace-one neighbours)"
        meaning = (f"({fmt_num(eps, 4)}, {fmt_num(delta)})-DP {unit}, replace-one: replacing one {u} of the "
                   f"{s.n_units} private training {u}s by any other changes the probability of any outcome by at "
                   f"most a factor e^ε, except with probability δ")
    else:
        eps, kind = budget, "budget: the composed epsilon of every mechanism is at most this (PLD accountant)"
        meaning = (f"(ε ≤ {fmt_num(eps, 4)}, δ = {fmt_num(delta)})-DP {unit}, add/remove: adding or removing "
                   f"one {u} of the private training data changes the probability of any outcome (this bundle "
                   f"included) by at most a factor e^ε, except with probability δ")
    limits = {}
    if eps is not None and math.isfinite(eps):
        limits = {"membership_auc": eps_delta_auc_limit(eps, delta),
                  "membership_tpr": {f"{f * 100:g}% FPR": eps_delta_tpr_limit(f, eps, delta) for f in FPRS},
                  "source": "any (ε, δ)-DP mechanism (Kairouz et al. 2015); vacuous (≈ 1) at large ε"}
    out = SharedPrivacy(neighbouring=s.neighbouring, epsilon=eps, epsilon_kind=kind, delta=delta, unit=unit,
                        meaning=meaning, covers=covers, does_not_cover=not_covered, mechanisms=shared, limits=limits)
    if disclose_n:
        out.n_units, out.epsilon_add_remove = s.n_units, s.epsilon_add_remove
        out.mechanism_limits = _mechanism_limits(s)
    else:
        out.not_stated = (f"the number of private {u}s N and what it follows from (the sample rate, the noise "
                          f"multiplier, the exact spent ε, mechanism-specific bounds): under add/remove neighbours N "
                          f"must stay secret. They are in the data holder's internal review. A recipient who learns "
                          f"N elsewhere should read the guarantee as replace-one, about twice this ε.")
    return out


def _mechanism_limits(s) -> dict | None:
    """Reconstruction and membership limits of the composition of every released mechanism
    (replace-one: N is public, so they may be stated)."""
    from dpgen.privacy.bounds import rero_bound_events

    if s.non_private or not s.events or not s.n_units:
        return None
    kappa = 1.0 / s.n_units
    rero = rero_bound_events(s.events, kappa, neighbouring=s.neighbouring)
    tpr = {f"{f * 100:g}% FPR": rero_bound_events(s.events, f, neighbouring=s.neighbouring)["bound"] for f in FPRS}
    return {"reconstruction": {"kappa": kappa, "bound": rero["bound"],
                               "meaning": f"an attacker who would guess one record with prior probability 1/N succeeds "
                                          f"at reconstructing it with probability at most {fmt_num(rero['bound'])}"},
            "membership_tpr": tpr, "mechanisms": s.release_mechanisms,
            "source": "the trade-off curve of every released mechanism composed (PLD, dp-accounting)"}


__all__ = ["SharedMechanism", "SharedPrivacy", "shared_privacy"]
