"""What the coordinator's run directory records about the sites, read back per site.

The coordinator spends no privacy of its own: every DP guarantee in a federation belongs to a
site, for that site's data, by that site's accountant, in that site's ledger. The coordinator's
ledger (RUN/privacy/ledger.jsonl) holds *reported facts*, as typed entries of
dpgen/privacy/schema.py (validated on every write and read):

    fed_site_plan      a site's public plan (SitePlanFacts), as it reported it when it first joined
    fed_site_refused   a site that would not take a round, and why (budget, image shape, ...)
    fed_site_progress  a site's state after a round it contributed to (SiteProgressFacts)
    fed_round          an aggregated round: contributors, public FedAvg weights, SecAgg+ settings,
                       the global model's fingerprint before and after, its checkpoint
    fed_round_failed   a round that was not aggregated (too few updates) and why
    fed_site_final     a site's state when the federation finished (confirmed, or its last report)
    fed_finished       the federation is over: with the finals it completes
                       `dp_sgd:federated_finetune`, the mechanism the global model and the cohort
                       name as their privacy source

None is a dp_plan / dp_progress / dp_complete / dp_release entry, so the ledger composes no
single epsilon for a federation; `PrivacyLedger.summary().federated` (a FederatedState) is the
per-site view, and the release allow-lists the cohort only if that view says every
contributing site's DP-SGD finished with noise, a passed preflight and within its own budget.

What a site reports never depends on its number of private units N (no N, sample rate, noise
multiplier; the exact epsilon only for a site whose relation is replace-one): see
dpgen.federated.local_training.
"""

from __future__ import annotations

from pathlib import Path

from dpgen.privacy.schema import REPORTED_BY_SITE

REPORTED_BY = REPORTED_BY_SITE


def federated_state(run_dir: str | Path):
    """The FederatedState of a coordinator's ledger (None if it records no federation)."""
    from dpgen.federated.local_training import ledger

    led = ledger(run_dir)
    if not led.exists():
        return None
    return led.summary().federated


def site_guarantee(s) -> dict:
    """One site's guarantee as the coordinator's ledger records it (a SiteState)."""
    p, cur = s.plan, s.last
    exact = cur.epsilon_replace_one if cur is not None else None
    return {
        "site": s.name, "unit": p.unit if p else None, "target_epsilon": p.target_epsilon if p else None,
        "delta": p.delta if p else None, "neighbouring": p.neighbouring if p else None,
        "accountant": p.accountant if p else None,
        # under add/remove neighbours a site reports its budget, never its exact epsilon (a function of N)
        "epsilon": exact if exact is not None else (p.target_epsilon if p else None),
        "epsilon_kind": "exact (replace-one, reported)" if exact is not None else "at most the site's budget",
        "within_budget": bool(cur is not None and cur.within_budget),
        "planned_rounds": p.rounds if p else None, "local_steps": p.local_steps if p else None,
        "expected_batch_size": p.expected_batch_size if p else None,
        "steps_done": cur.steps_done if cur else 0, "planned_steps": p.planned_steps if p else None,
        "rounds_contributed": s.rounds, "complete": bool(cur is not None and cur.complete),
        "confirmed_at_finish": s.confirmed, "refused": s.refusals, "dropped_rounds": s.dropped,
        "source": REPORTED_BY,
    }


def per_site_guarantees(run_dir: str | Path) -> list[dict]:
    """Each site's guarantee as the coordinator's ledger records it (latest facts per site)."""
    state = federated_state(run_dir)
    return [] if state is None else [site_guarantee(s) for s in state.sites.values()]


def format_guarantees(rows: list[dict]) -> str:
    if not rows:
        return "no site took part (the coordinator's ledger holds no site plan)"
    lines = ["per-site privacy guarantees (each for that site's data only; reported by the sites, not verifiable by "
             "the coordinator; no bound across sites):"]
    for r in rows:
        if r["target_epsilon"] is None or not r["rounds_contributed"]:
            lines.append(f"  {r['site']}: contributed to no aggregated round"
                         + (f" (budget epsilon {r['target_epsilon']:g})" if r["target_epsilon"] is not None else "")
                         + (f"; refused: {'; '.join(r['refused'])}" if r["refused"] else ""))
            continue
        eps = (f"epsilon {r['epsilon']:.3f} ({r['epsilon_kind']})" if r["epsilon_kind"].startswith("exact")
               else f"epsilon <= {r['target_epsilon']:g} (its budget)")
        state = "complete" if r["complete"] else "stopped before its plan was used up"
        lines.append(
            f"  {r['site']}: {eps} at delta {r['delta']:g}, {r['unit']}, {r['neighbouring'].replace('_', '/')} "
            f"neighbours ({'within' if r['within_budget'] else 'NOT within'} its budget); rounds "
            f"{r['rounds_contributed'] or '-'}, {r['steps_done']}/{r['planned_steps']} steps, {state}"
            + ("" if r["confirmed_at_finish"] or not r["rounds_contributed"] else ", not confirmed at the end"))
        for why in r["refused"]:
            lines.append(f"    refused: {why}")
    return "\n".join(lines)
