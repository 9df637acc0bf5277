"""What the coordinator's run directory records about the sites, as typed ledger entries.

The coordinator spends no privacy of its own: every DP guarantee in a federation belongs to a
site, for that site's data, by that site's accountant, in that site's ledger. The coordinator's
ledger (RUN/privacy/ledger.jsonl) therefore holds *reported facts*, one kind per fact:

    fed_site_plan      a site's public plan, as the site reported it when it first joined
    fed_site_refused   a site that would not take a round, and why (budget, image shape, ...)
    fed_site_progress  a site's privacy spent after a round it contributed to
    fed_round          an aggregated round: contributors, public FedAvg weights, SecAgg+ settings,
                       the global model's fingerprint before and after, its checkpoint
    fed_round_failed   a round that was not aggregated (too few updates) and why
    fed_site_final     a site's facts when the federation finished (its completion entry)

None of them is a dp_plan / dp_progress / dp_complete / dp_release entry, so the ledger's
`events()` (and `dpgen privacy report`) compose nothing for a federation: there is no single
epsilon. `per_site_guarantees(run_dir)` reads the per-site statement; CARD_NOTE says what the
release card must state.

Units and relation: each site states its own unit ("per image" or "per subject") and
neighbouring relation. Facts the sites report never include a count of private data (no N,
sample rate or noise multiplier: those stay in the site's ledger).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

REPORTED_BY = "reported by the site (its own accountant and ledger)"

CARD_NOTE = """\
What the release card of a federated run must state (dpgen/report is being rewritten; this is
the content, per_site_guarantees() gives the values):

1. There is no single epsilon. The guarantee is per site: for each site s, the model and the
   cohort are (epsilon_s, delta_s)-DP with respect to site s's data, unit of privacy unit_s
   (per image / per subject), neighbouring relation rel_s, by site s's own accountant (PLD),
   over all rounds s took part in. List every site with epsilon_s spent, delta_s, unit_s,
   target_s, rounds and steps done, and "complete" / "stopped early".
2. These figures are reported by the sites; the coordinator cannot verify them (it never sees
   the sites' data or noise). Name where each site's ledger lives.
3. No guarantee across sites: a patient at two hospitals is protected at each by that site's
   epsilon; nothing bounds the composition unless user-level DP across sites was configured.
4. Secure aggregation: whether SecAgg+ was on, its reconstruction threshold and num_shares
   (the coordinator saw only sums of at least min_sites updates; a coordinator colluding with
   threshold-many sites could unmask one site's update, which is still DP for that site).
5. The cohort is post-processing of the final global model (privacy source
   "post-processing of the sites' DP-SGD updates"); pretraining used public data only.
6. Sites that refused or dropped out, and why (fed_site_refused, fed_round_failed).
"""


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def entry(self) -> dict:
        return self.model_dump(mode="json")


class SitePlanFacts(BaseModel):
    model_config = ConfigDict(extra="allow")

    site: str
    unit: str
    target_epsilon: float
    delta: float
    accountant: str
    neighbouring_relation: str = "add_remove"
    rounds: int
    local_steps: int
    planned_steps: int
    expected_batch_size: int
    max_grad_norm: float
    noise_multiplicity: int = 1


class SiteProgressFacts(BaseModel):
    model_config = ConfigDict(extra="allow")

    site: str
    round: int | None = None
    steps_done: int
    planned_steps: int
    epsilon_pld: float
    epsilon_rdp: float
    delta: float
    target_epsilon: float
    within_target: bool
    unit: str
    complete: bool = False


class FedSitePlan(_Entry):
    kind: Literal["fed_site_plan"] = "fed_site_plan"
    site: str
    first_round: int
    plan: SitePlanFacts
    source: str = REPORTED_BY


class FedSiteRefused(_Entry):
    kind: Literal["fed_site_refused"] = "fed_site_refused"
    site: str | None
    round: int
    reason: str
    fatal: bool


class FedSiteProgress(_Entry):
    kind: Literal["fed_site_progress"] = "fed_site_progress"
    site: str
    round: int
    progress: SiteProgressFacts
    update_max_abs: float | None = None
    secagg_clipped_entries: int | None = None
    replayed: bool = False
    source: str = REPORTED_BY


class SecureAggregationFacts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool
    protocol: str | None = None
    num_shares: int | float | None = None
    reconstruction_threshold: int | float | None = None
    clipping_range: float | None = None
    quantization_range: int | None = None
    max_weight: float | None = None


class FedRound(_Entry):
    kind: Literal["fed_round"] = "fed_round"
    round: int
    attempt: int
    sites: list[str]
    weights: dict[str, int]  # public FedAvg weights: each site's configured expected batch size
    weighting: str = "FedAvg weighted by the sites' configured expected batch sizes (public)"
    secure_aggregation: SecureAggregationFacts
    dropped: list[str] = []
    global_before: str
    global_after: str
    checkpoint: str
    checkpoint_sha256: str


class FedRoundFailed(_Entry):
    kind: Literal["fed_round_failed"] = "fed_round_failed"
    round: int
    attempt: int
    reason: str
    selected: list[str]
    contributed: list[str]  # sent an update (masked, with SecAgg+) that was not aggregated
    failures: list[str] = []
    stages: list[dict] = []  # per message stage: which sites it went to and which answered


class FedSiteFinal(_Entry):
    kind: Literal["fed_site_final"] = "fed_site_final"
    site: str
    progress: SiteProgressFacts | None
    confirmed: bool  # False: the site did not answer the finish message; its last reported facts
    source: str = REPORTED_BY


def per_site_guarantees(run_dir: str | Path) -> list[dict]:
    """Each site's guarantee as the coordinator's ledger records it (latest facts per site)."""
    from dpgen.federated.local_training import ledger

    entries = ledger(run_dir).entries()
    plans, progress, final, rounds = {}, {}, {}, {}
    for e in entries:
        kind = e.get("kind")
        if kind == "fed_site_plan":
            plans.setdefault(e["site"], e["plan"])
        elif kind == "fed_site_progress":
            progress[e["site"]] = e["progress"]
        elif kind == "fed_site_final":
            final[e["site"]] = e
        elif kind == "fed_round":
            for s in e["sites"]:
                rounds.setdefault(s, []).append(e["round"])
    out = []
    for site, plan in plans.items():
        fin = final.get(site)
        cur = (fin or {}).get("progress") or progress.get(site) or {}
        eps = cur.get("epsilon_pld", 0.0)
        out.append({
            "site": site, "unit": plan["unit"], "epsilon": eps, "epsilon_rdp": cur.get("epsilon_rdp", 0.0),
            "delta": plan["delta"], "target_epsilon": plan["target_epsilon"],
            "within_target": bool(eps <= plan["target_epsilon"] * (1 + 1e-9)) if math.isfinite(eps) else False,
            "neighbouring_relation": plan.get("neighbouring_relation", "add_remove"),
            "accountant": plan["accountant"], "planned_rounds": plan["rounds"], "local_steps": plan["local_steps"],
            "steps_done": cur.get("steps_done", 0), "planned_steps": plan["planned_steps"],
            "rounds_contributed": sorted(set(rounds.get(site, []))), "complete": bool(cur.get("complete")),
            "confirmed_at_finish": bool(fin and fin.get("confirmed")), "source": REPORTED_BY,
        })
    return out


def format_guarantees(rows: list[dict]) -> str:
    if not rows:
        return "no site took part (the coordinator's ledger holds no site plan)"
    lines = ["per-site privacy guarantees (each for that site's data only; reported by the sites):"]
    for r in rows:
        state = "complete" if r["complete"] else "stopped before its plan was used up"
        lines.append(
            f"  {r['site']}: epsilon {r['epsilon']:.3f} (PLD; RDP {r['epsilon_rdp']:.3f}) at delta {r['delta']:g}, "
            f"{r['unit']}, {r['neighbouring_relation'].replace('_', '/')}, target {r['target_epsilon']:g} "
            f"({'within' if r['within_target'] else 'EXCEEDS'}); rounds {r['rounds_contributed']}, "
            f"{r['steps_done']}/{r['planned_steps']} steps, {state}")
    return "\n".join(lines)
