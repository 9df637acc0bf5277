"""The release checklist: each question answered pass / warn / fail with a one-line reason.

    preflight    the per-sample-gradient preflight passed for every released DP-SGD mechanism
    epsilon      the composed epsilon of every released mechanism is within the run's one budget
    delta        delta is below 1/N (with delta >= 1/N a mechanism may publish a record outright)
    near_copies  no excess of near-copies of private training images (probes)
    membership   the membership attack's TPR at 1% FPR is within the limit of the composed
                 mechanisms' trade-off curve (its AUC shown beside)
    utility      a classifier trained on the cohort beats DP-SGD on the real data (evaluation)

`checklist(info)` is the data holder's internal review: delta, near_copies, membership and
utility are computed from private data without DP. `shareable_checklist(info)` holds the rows
whose answers depend on nothing private (the preflight runs on random inputs; the budget check
is the accountant's promise), worded so that they state no private quantity.

A missing input is a "warn" ("not run"), never a crash. The evaluation and probe files arrive
parsed into the schemas their writers validate against (dpgen.core.schemas).
"""

from __future__ import annotations

import math

from dpgen.core.schemas import DPLimitRow, MemorizationSummary, TprAtFpr
from dpgen.privacy.bounds import eps_delta_auc_limit as membership_auc_limit
from dpgen.report.runinfo import RunInfo, fmt_num

STATUSES = ("pass", "warn", "fail")
CHECKS = (
    ("preflight", "Per-sample-gradient preflight passed"),
    ("epsilon", "Epsilon within the budget"),
    ("delta", "Delta below 1/N"),
    ("near_copies", "No near-copies above the held-out reference"),
    ("membership", "Membership TPR at 1% FPR within the DP limit"),
    ("utility", "Utility above the DP-SGD baseline"),
)
SHAREABLE = ("preflight", "epsilon")
TITLES = dict(CHECKS)
PRIMARY_FPR = "1%"


def _item(cid: str, status: str, reason: str, **details) -> dict:
    assert status in STATUSES, status
    return {"id": cid, "title": TITLES[cid], "status": status, "reason": reason, "details": details}


def _ci_text(ci) -> str:
    return f" [{fmt_num(ci[0])}, {fmt_num(ci[1])}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""


# ----------------------------------------------------------------------------- ledger checks


def preflight_check(info: RunInfo) -> dict:
    s = info.privacy
    dpsgd = {n: m for n, m in (s.mechanisms.items() if s else []) if m.scope == "release"}
    if not dpsgd:
        if info.privacy is None and info.entries:
            return _item("preflight", "fail", f"the privacy ledger cannot be read: {info.privacy_note}")
        return _item("preflight", "warn", "no DP-SGD mechanism in the ledger: nothing to preflight")
    pre = info.preflights()
    problems, good = [], []
    for mech in dpsgd:
        p = pre.get(mech)
        if p is None:
            problems.append(f"{mech}: no preflight record")
        elif not p.passed:
            failed = getattr(p, "failed_parameters", None) or []
            problems.append(f"{mech}: preflight FAILED ({len(failed)} parameter(s), e.g. {', '.join(map(str, failed[:3]))})")
        else:
            good.append(f"{mech}: max relative error {fmt_num(p.max_relative_error)} ≤ tolerance "
                        f"{fmt_num(getattr(p, 'tolerance', None))} ({p.mode} mode, float64, random inputs)")
    if problems:
        return _item("preflight", "fail", "; ".join(problems))
    return _item("preflight", "pass", "; ".join(good))


def epsilon_check(info: RunInfo, shareable: bool = False) -> dict:
    """Shareable wording states the budget only (the exact spent epsilon is a function of N)."""
    s = info.privacy
    if s is None:
        return _item("epsilon", "fail", f"no privacy accounting: {info.privacy_note}")
    if not s.mechanisms and not s.releases:
        return _item("epsilon", "pass", "no DP mechanism ran: the cohort used no private data (ε = 0)", epsilon=0.0)
    if s.non_private:
        return _item("epsilon", "fail", "ε = ∞: a mechanism ran without noise; the cohort is NOT differentially private")
    if s.budget_problem:
        return _item("epsilon", "fail", s.budget_problem)
    relation = s.neighbouring.replace("_", "/")
    if s.target_epsilon is None:
        return _item("epsilon", "fail", "the ledger states no budget for the run's mechanisms")
    if shareable and s.neighbouring == "add_remove":
        spent = f"the composed ε of every released mechanism ({relation} neighbours, PLD accountant)"
        if s.within_target:
            return _item("epsilon", "pass", f"{spent} is within the budget ε ≤ {fmt_num(s.target_epsilon, 4)}")
        return _item("epsilon", "fail", f"{spent} EXCEEDS the budget ε = {fmt_num(s.target_epsilon, 4)}")
    spent = (f"ε = {fmt_num(s.epsilon, 4)} (PLD" + (f"; RDP cross-check {fmt_num(s.epsilon_rdp, 4)}" if s.epsilon_rdp
                                                    is not None else "")
             + f") at δ = {fmt_num(s.delta)}, {relation} neighbours, {s.unit}, composed over "
             + ", ".join(s.release_mechanisms))
    if s.within_target:
        return _item("epsilon", "pass", f"{spent} ≤ budget {fmt_num(s.target_epsilon, 4)}", epsilon=s.epsilon,
                     budget=s.target_epsilon)
    return _item("epsilon", "fail", f"{spent} EXCEEDS the budget {fmt_num(s.target_epsilon, 4)}", epsilon=s.epsilon,
                 budget=s.target_epsilon)


def delta_check(info: RunInfo) -> dict:
    s = info.privacy
    if s is None or not s.n_units:
        return _item("delta", "warn", "the ledger does not state the number of private units")
    bound = 1.0 / s.n_units
    if s.delta < bound:
        return _item("delta", "pass", f"δ = {fmt_num(s.delta)} < 1/N = 1/{s.n_units} = {fmt_num(bound)}")
    return _item("delta", "fail", f"δ = {fmt_num(s.delta)} ≥ 1/N = 1/{s.n_units}: a mechanism meeting this guarantee "
                                  f"may publish a {str(s.unit).removeprefix('per ')} outright")


# ----------------------------------------------------------------------------- probe checks


def near_copies_check(info: RunInfo) -> dict:
    if info.probes is None:
        return _item("near_copies", "warn", f"{info.probes_note}: no memorization probe results")
    mem = info.probes.memorization
    if mem is None or "flagged" not in mem.model_fields_set:
        return _item("near_copies", "warn", "the probes summary has no memorization results")
    detail = "; ".join(_near_copy_counts(mem))
    text = f"{mem.verdict or ''}" + (f" ({detail})" if detail else "")
    if mem.flagged is True:
        return _item("near_copies", "fail", text or "memorization flagged")
    if mem.flagged is False:
        return _item("near_copies", "pass", text or "not flagged")
    return _item("near_copies", "warn", text or "no verdict (no held-out reference)")


def _near_copy_counts(mem: MemorizationSummary) -> list[str]:
    out = []
    for space, e in mem.spaces.items():
        sy, ho = e.synthetic, e.held_out
        if sy is not None and sy.near_copies is not None:
            txt = f"{space}: {sy.near_copies}/{sy.n} synthetic near-copies"
            if ho is not None and ho.near_copies is not None:
                txt += f" vs {ho.near_copies}/{ho.n} held-out real"
            out.append(txt)
    return out


def membership_check(info: RunInfo) -> dict:
    """TPR at 1% FPR against the limit of the composed mechanisms' trade-off curve (which can
    fail at any epsilon), the AUC beside it (its (epsilon, delta) limit is ~1 at large epsilon)."""
    if info.probes is None:
        return _item("membership", "warn", f"{info.probes_note}: no membership-inference results")
    mm = info.probes.membership
    if mm is None or not mm.dp_model:
        return _item("membership", "warn", "the probes summary has no membership-inference results")
    name, r = mm.primary()
    t = r.tpr_at_fpr.get(PRIMARY_FPR) or TprAtFpr()
    row = mm.dp_limits.per_fpr.get(PRIMARY_FPR) or DPLimitRow()
    limit, tpr, ci = row.mechanism_pld, t.tpr, t.ci
    auc_text = (f"; AUC {fmt_num(r.auc)}{_ci_text(r.auc_ci)} (any attack ≤ {fmt_num(mm.dp_limits.auc_eps_delta, 4)} "
                f"at (ε, δ))")
    if tpr is None:
        return _item("membership", "warn", f"{name} attack has no TPR at {PRIMARY_FPR} FPR" + auc_text)
    if limit is None:
        return _item("membership", "warn", f"{name} attack TPR at {PRIMARY_FPR} FPR {fmt_num(tpr)}{_ci_text(ci)}, but no "
                     f"mechanism limit (no DP fine-tuning?)" + auc_text, tpr=tpr, auc=r.auc)
    lo = ci[0] if ci and ci[0] is not None else tpr
    text = (f"{name} attack TPR at {PRIMARY_FPR} FPR {fmt_num(tpr)}{_ci_text(ci)} vs {fmt_num(limit)}, the largest any "
            f"attack can reach against the composed mechanisms ({', '.join(info.privacy.release_mechanisms) if info.privacy else '?'})")
    if lo > limit:
        status, text = "fail", text + ": EXCEEDS the limit (the implementation leaks more than it claims)"
    elif tpr > limit:
        status, text = "warn", text + ": above the limit, but within the interval"
    else:
        status = "pass"
    oc = mm.overfit_control
    if oc is not None and oc.caught is False and status == "pass":
        status = "warn"
        text += "; but the attack did not catch the non-DP overfit control, so it has little power here"
    elif oc is not None and oc.caught is True:
        text += "; the same attack catches a non-DP overfit control"
    return _item("membership", status, text + auc_text, tpr=tpr, limit=limit, auc=r.auc)


# ----------------------------------------------------------------------------- utility


def utility_check(info: RunInfo) -> dict:
    ev = info.evaluation
    if ev is None:
        return _item("utility", "warn", f"{info.evaluation_note}: no downstream utility")
    syn, syn_sd = ev.auc("synthetic")
    base, base_sd = ev.auc("dp_real")
    if syn is None or base is None:
        missing = [n for n, v in (("synthetic (TSTR)", syn), ("dp_real (DP-SGD baseline)", base)) if v is None]
        return _item("utility", "warn", f"the evaluation lacks the {' and '.join(missing)} row(s)")
    spread = math.sqrt((syn_sd or 0) ** 2 + (base_sd or 0) ** 2)
    d = dict(tstr_auc=syn, tstr_std=syn_sd, dp_sgd_auc=base, dp_sgd_std=base_sd)
    ceiling, _ = ev.auc("real")
    text = f"TSTR ROC-AUC {fmt_num(syn)} vs DP-SGD baseline {fmt_num(base)} (a separate mechanism at the same ε)"
    if ceiling is not None:
        d["ceiling_auc"] = ceiling
        text += f", non-private ceiling {fmt_num(ceiling)}"
    if syn <= base:
        return _item("utility", "fail", f"{text}: the cohort does not beat training with DP-SGD directly", **d)
    if syn - base <= spread:
        return _item("utility", "warn", f"{text}: above, but within the seed spread (±{fmt_num(spread, 2)})", **d)
    return _item("utility", "pass", f"{text}: above the baseline by {fmt_num(syn - base, 2)}", **d)


# ----------------------------------------------------------------------------- the lists


def checklist(info: RunInfo) -> list[dict]:
    """The internal review's checks, in the order of `CHECKS`."""
    return [preflight_check(info), epsilon_check(info), delta_check(info), near_copies_check(info),
            membership_check(info), utility_check(info)]


def shareable_checklist(info: RunInfo) -> list[dict]:
    """The checks whose answers depend on nothing private, worded to state nothing private."""
    return [preflight_check(info), epsilon_check(info, shareable=True)]


def overall(items: list[dict]) -> str:
    st = {i["status"] for i in items}
    return "fail" if "fail" in st else "warn" if "warn" in st else "pass"


__all__ = ["CHECKS", "SHAREABLE", "STATUSES", "checklist", "shareable_checklist", "overall", "membership_auc_limit"]
