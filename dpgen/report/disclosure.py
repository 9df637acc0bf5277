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

A federated coordinator's cohort (dpgen.federated) has no single epsilon: the statement is per
contributing site (its budget, or its exact replace-one figure when that site chose replace-one;
its delta, unit and relation), reported by the sites and not verifiable by the coordinator, with
no bound across sites, the secure-aggregation settings, and the sites that refused or dropped
out. No site's N, sample rate or noise multiplier ever reaches the coordinator.
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
    # A federation: one guarantee per site (no single epsilon), and how the sites' updates were
    # combined (rounds, secure aggregation, sites that refused or dropped out). None otherwise.
    sites: list[dict] | None = None
    federation: dict | None = None

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


def _limits(eps: float | None, delta: float | None) -> dict:
    if eps is None or delta is None or not math.isfinite(eps):
        return {}
    return {"membership_auc": eps_delta_auc_limit(eps, delta),
            "membership_tpr": {f"{f * 100:g}% FPR": eps_delta_tpr_limit(f, eps, delta) for f in FPRS},
            "source": "any (ε, δ)-DP mechanism (Kairouz et al. 2015); vacuous (≈ 1) at large ε"}


def _site_statement(site) -> dict:
    """One site's guarantee from what it reported: its budget (add/remove: an upper bound that
    does not depend on its N) or its exact replace-one epsilon, delta, unit, relation."""
    p, cur = site.plan, site.last
    exact = cur.epsilon_replace_one if cur is not None else None
    eps = exact if exact is not None else p.target_epsilon
    rel = p.neighbouring
    u = _unit_words(p.unit)
    return {
        "site": site.name, "epsilon": eps,
        "epsilon_kind": ("exact spent ε for replace-one neighbours (the site treats its N as public), reported by the "
                         "site") if exact is not None else "the site's budget: its composed ε is at most this (its "
                                                            "own PLD accountant), reported by the site",
        "budget": p.target_epsilon, "delta": p.delta, "unit": p.unit, "neighbouring": rel,
        "meaning": (f"(ε {'=' if exact is not None else '≤'} {fmt_num(eps, 4)}, δ = {fmt_num(p.delta)})-DP {p.unit} "
                    f"with respect to site {site.name}'s own training data, {rel.replace('_', '/')}: "
                    + (f"replacing one {u}" if rel == "replace_one" else f"adding or removing one {u}")
                    + f" of site {site.name}'s data changes the probability of any outcome by at most a factor "
                      f"e^ε, except with probability δ"),
        "within_budget": bool(cur is not None and cur.within_budget),
        "rounds_contributed": site.rounds, "steps_done": cur.steps_done if cur else 0, "planned_steps": p.planned_steps,
        "complete": bool(cur is not None and cur.complete), "confirmed_at_finish": site.confirmed,
        "user_choices": {"rounds": p.rounds, "local_steps": p.local_steps,
                         "expected_batch_size": p.expected_batch_size, "max_grad_norm": p.max_grad_norm,
                         "noise_multiplicity": p.noise_multiplicity, "accountant": p.accountant},
        "limits": _limits(eps, p.delta),
        "source": "reported by the site (its own ledger and accountant); the coordinator cannot verify it",
    }


def _federated_privacy(info: RunInfo) -> SharedPrivacy:
    """A federated coordinator's cohort: DP per site, no single epsilon (see dpgen.federated)."""
    f = info.privacy.federated
    sites = sorted((_site_statement(s) for s in f.contributors if s.plan is not None), key=lambda r: r["site"])
    units = sorted({r["unit"] for r in sites})
    out = [{"site": s.name, "reason": "; ".join(s.refusals) or "never contributed to an aggregated round"}
           for s in f.sites.values() if not s.contributed]
    dropped = [{"site": s.name, "rounds": s.dropped} for s in f.sites.values() if s.dropped]
    failed = [{"round": r.round, "attempt": r.attempt, "reason": r.reason} for r in f.failed]
    settings = []
    for r in f.rounds:
        sa = r.secure_aggregation.model_dump(mode="json")
        if sa not in settings:
            settings.append(sa)
    federation = {
        "rounds": [r.round for r in f.rounds], "contributing_sites": [r["site"] for r in sites],
        "weighting": "FedAvg weighted by each site's configured expected batch size (a public choice, never a data "
                     "count)",
        "secure_aggregation": settings,
        "did_not_take_part": out, "dropped_out": dropped, "failed_rounds": failed,
        "no_bound_across_sites": "nothing bounds what the sites' data sets reveal together: a patient whose images "
                                 "are at two sites is protected at each by that site's ε separately (no composition "
                                 "across sites is stated)",
        "reported_not_verified": "every per-site figure is what the site reported to the coordinator; the coordinator "
                                 "never sees a site's data, noise or ledger and cannot verify them",
    }
    covers = ["every file of this bundle: the synthetic images and labels (and the global model's weights when "
              "included), computed from the sites' DP-SGD updates and public randomness (post-processing)",
              "for each contributing site, that site's private TRAINING data, per its own unit and neighbouring "
              "relation, at its own (ε, δ) (the per-site statements)"]
    not_covered = [
        "the public pretraining data, which the generator may reproduce",
        "a patient across sites: no bound covers the sites' data sets together",
        "sites that did not contribute to an aggregated round (they released nothing into this bundle)",
        "anything a site did outside the federation",
    ]
    meaning = ("per-site differential privacy, no single ε: for each contributing site s, everything in this bundle "
               "is (ε_s, δ_s)-DP with respect to site s's own training data (its unit, its neighbouring relation, "
               "its own accountant, over every round it took part in); figures reported by the sites, not verifiable "
               "by the coordinator; no bound across sites")
    return SharedPrivacy(
        neighbouring="per site", epsilon=None, epsilon_kind="per site (no single ε)", delta=None,
        unit=units[0] if len(units) == 1 else "per site: " + ", ".join(units), meaning=meaning, covers=covers,
        does_not_cover=not_covered, sites=sites, federation=federation,
        not_stated=("each site's number of private units N and what it follows from (its sample rate, noise "
                    "multiplier and exact spent ε): under add/remove neighbours they stay at the site and were never "
                    "sent to the coordinator; a site under replace-one neighbours reported its exact ε"))


def shared_privacy(info: RunInfo) -> SharedPrivacy:
    """The privacy facts any shareable output of this run may state (see the module docstring)."""
    s = info.privacy
    if s is not None and s.federated is not None:
        return _federated_privacy(info)
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
