"""The release checklist: five questions, each answered pass / warn / fail with a one-line reason.

    preflight    the per-sample-gradient preflight passed (ledger "preflight" entries)
    epsilon      the spent epsilon is within the target (ledger summary, PLD)
    near_copies  no near-copies of private training images above threshold (probes summary)
    membership   the membership-inference AUC is within what the DP guarantee allows (probes summary)
    utility      a classifier trained on the cohort beats DP-SGD on the real data (evaluation.json)

A missing input is a "warn" ("not run"), never a crash. What `fail` means is spelled out in the
README ("Release review: how to read it").

Reading RUN/metrics/probes_summary.json
---------------------------------------
The probes stage owns that file's layout. The checklist uses, in this order:
1. `checks.<id>.status` (pass/warn/fail) and `checks.<id>.reason`, for id near_copies / membership,
   when the probes stage states its own verdict;
2. otherwise a section whose key names the probe (`memorization` / `near_copies` ...,
   `membership` / `mia` ...), searched recursively for a verdict (`flagged`, `memorization_flagged`,
   `excess`: true = fail; `passed` / `pass`: false = fail; `verdict` / `status` strings), a count
   (`n_near_copies`, `near_copies`, `n_above_threshold`...), an attack AUC (`auc`, `roc_auc`,
   `attack_auc`, or {"mean": ...}) and a limit (`dp_limit`, `auc_limit`, `auc_upper_bound`,
   `max_auc`...). Without a limit in the file, the membership limit is computed here from the
   ledger's (epsilon, delta): `membership_auc_limit`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterator

import numpy as np

from dpgen.report.runinfo import RunInfo, as_float, fmt_num

STATUSES = ("pass", "warn", "fail")
CHECKS = (
    ("preflight", "Per-sample-gradient preflight passed"),
    ("epsilon", "Epsilon within target"),
    ("near_copies", "No near-copies above threshold"),
    ("membership", "Membership AUC within the DP limit"),
    ("utility", "Utility above the DP-SGD baseline"),
)
TITLES = dict(CHECKS)


def _item(cid: str, status: str, reason: str, **details) -> dict:
    assert status in STATUSES, status
    return {"id": cid, "title": TITLES[cid], "status": status, "reason": reason, "details": details}


# ----------------------------------------------------------------------------- theory


def membership_auc_limit(epsilon: float | None, delta: float | None) -> float | None:
    """The largest ROC-AUC any membership test can reach against an (epsilon, delta)-DP mechanism.

    (epsilon, delta)-DP bounds every test's true-positive rate at false-positive rate a by
    TPR(a) <= min(1, e^eps a + delta, 1 - e^-eps (1 - delta - a)) (Kairouz et al. 2015); the AUC
    limit is the area under that curve. It is 0.5 at epsilon = 0, delta = 0 and tends to 1 as
    epsilon grows (about 0.99 at epsilon 8): a large epsilon promises little against this attack.
    """
    if epsilon is None or delta is None:
        return None
    if math.isinf(epsilon) or epsilon > 700:
        return 1.0
    a = np.linspace(0.0, 1.0, 200_001)
    e = math.exp(epsilon)
    tpr = np.minimum.reduce([np.ones_like(a), e * a + delta, 1 - (1 - delta - a) / e])
    tpr = np.clip(tpr, 0.0, 1.0)
    return float(np.clip(np.trapezoid(tpr, a) if hasattr(np, "trapezoid") else np.trapz(tpr, a), 0.5, 1.0))


# ----------------------------------------------------------------------------- probes summary


def _walk(obj: Any, path: tuple = ()) -> Iterator[tuple[tuple, str, Any]]:
    """(path, key, value) for every leaf under `obj` (dict keys; list items get their index)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (dict, list)):
                yield from _walk(v, path + (str(k),))
            else:
                yield path, str(k), v
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            if isinstance(v, (dict, list)):
                yield from _walk(v, path + (str(i),))


def find_section(probes: dict | None, pattern: str) -> tuple[str, dict] | tuple[None, None]:
    """The first dict (breadth-first) whose key matches `pattern` (case-insensitive)."""
    if not isinstance(probes, dict):
        return None, None
    rx = re.compile(pattern, re.I)
    queue: list[tuple[str, Any]] = [(k, v) for k, v in probes.items() if k != "checks"]
    while queue:
        k, v = queue.pop(0)
        if isinstance(v, dict):
            if rx.search(k):
                return k, v
            queue.extend((f"{k}.{k2}", v2) for k2, v2 in v.items())
    return None, None


_FLAG_TRUE_FAILS = re.compile(r"^(flagged|memorization_flagged|near_copies_flagged|excess|significant|memorized)$", re.I)
_FLAG_FALSE_FAILS = re.compile(r"^(passed|pass|ok|within_limit|within_dp_limit)$", re.I)
_VERDICT = re.compile(r"^(verdict|status|result)$", re.I)
_COUNT = re.compile(r"^(n_?near_?cop(y|ies)|near_?cop(y|ies)(_count|_n)?|n_above(_threshold)?|count_above(_threshold)?|n_flagged)$", re.I)
_AUC = re.compile(r"^(auc|roc_auc|attack_auc|auc_mean|membership_auc)$", re.I)
_LIMIT = re.compile(r"(limit|upper_bound|max_auc|auc_bound|dp_auc|theoretical)", re.I)


def _verdict_of(section: dict) -> tuple[str | None, str]:
    """pass/fail from explicit verdict fields anywhere in a section (worst one wins)."""
    found: list[tuple[str, str]] = []
    for path, k, v in _walk(section):
        where = ".".join(path + (k,))
        if isinstance(v, bool) and _FLAG_TRUE_FAILS.match(k):
            found.append(("fail" if v else "pass", f"{where} = {str(v).lower()}"))
        elif isinstance(v, bool) and _FLAG_FALSE_FAILS.match(k):
            found.append(("pass" if v else "fail", f"{where} = {str(v).lower()}"))
        elif isinstance(v, str) and _VERDICT.match(k):
            low = v.lower().strip()
            if low.startswith(("no ", "not ", "pass", "ok", "within")):
                found.append(("pass", f"{where} = {v!r}"))
            elif any(w in low for w in ("fail", "flagged", "memoriz", "exceed")):
                found.append(("fail", f"{where} = {v!r}"))
    if not found:
        return None, ""
    worst = "fail" if any(s == "fail" for s, _ in found) else "pass"
    return worst, "; ".join(w for s, w in found if s == worst)[:300]


def _explicit_check(probes: dict | None, cid: str) -> dict | None:
    checks = probes.get("checks") if isinstance(probes, dict) else None
    c = checks.get(cid) if isinstance(checks, dict) else None
    if isinstance(c, dict) and c.get("status") in STATUSES:
        return _item(cid, c["status"], str(c.get("reason") or "as stated by the probes summary"), source="probes_summary.checks")
    return None


def near_copies_check(info: RunInfo) -> dict:
    if info.probes is None:
        return _item("near_copies", "warn", f"{info.probes_note}: no memorization probe results")
    explicit = _explicit_check(info.probes, "near_copies")
    if explicit:
        return explicit
    mem = info.probes.get("memorization")
    if isinstance(mem, dict) and "flagged" in mem:  # dpgen.probes' layout
        detail = "; ".join(_near_copy_counts(mem))
        verdict = str(mem.get("verdict") or "")
        text = f"{verdict} ({detail})" if detail else verdict
        if mem["flagged"] is True:
            return _item("near_copies", "fail", text or "memorization flagged", section="memorization")
        if mem["flagged"] is False:
            return _item("near_copies", "pass", text or "not flagged", section="memorization")
        return _item("near_copies", "warn", text or "no verdict (no held-out reference)", section="memorization")
    key, sec = find_section(info.probes, r"near.?cop|memori[sz]")
    if sec is None:
        return _item("near_copies", "warn", "the probes summary has no memorization / near-copy section")
    status, why = _verdict_of(sec)
    counts = [(".".join(p + (k,)), as_float(v)) for p, k, v in _walk(sec) if _COUNT.match(k) and as_float(v) is not None]
    worst = max(counts, key=lambda c: c[1]) if counts else None
    if status is not None:
        extra = f" (largest count {worst[0]} = {fmt_num(worst[1])})" if worst else ""
        return _item("near_copies", status, f"{key}: {why}{extra}", section=key)
    if worst is not None:
        st = "pass" if worst[1] == 0 else "fail"
        return _item("near_copies", st, f"{key}: {worst[0]} = {fmt_num(worst[1])} near-copies above threshold", section=key)
    return _item("near_copies", "warn", f"{key}: no verdict or near-copy count found in the probes summary", section=key)


def _near_copy_counts(mem: dict) -> list[str]:
    out = []
    for space, e in (mem.get("spaces") or {}).items():
        if not isinstance(e, dict):
            continue
        sy, ho = e.get("synthetic") or {}, e.get("held_out") or {}
        if "near_copies" in sy:
            txt = f"{space}: {sy['near_copies']}/{sy.get('n')} synthetic near-copies"
            if "near_copies" in ho:
                txt += f" vs {ho['near_copies']}/{ho.get('n')} held-out real"
            out.append(txt)
    return out


def _ci_text(ci: Any) -> str:
    return f" [{fmt_num(ci[0])}, {fmt_num(ci[1])}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""


def _primary_attack(mm: dict) -> tuple[str | None, dict | None]:
    scores = mm.get("dp_model") if isinstance(mm.get("dp_model"), dict) else {}
    if isinstance(scores.get("scores"), dict):
        scores = scores["scores"]
    name = mm.get("primary_score") if mm.get("primary_score") in scores else next(iter(scores), None)
    r = scores.get(name) if name is not None else None
    return name, (r if isinstance(r, dict) else None)


def _structured_membership(info: RunInfo, mm: dict, theory: float | None) -> dict | None:
    """dpgen.probes' layout: dp_model.<score>.auc (+ auc_ci), dp_limits, overfit_control."""
    name, r = _primary_attack(mm)
    if r is None or as_float(r.get("auc")) is None:
        return None
    auc, ci = as_float(r["auc"]), r.get("auc_ci")
    lim = mm.get("dp_limits") if isinstance(mm.get("dp_limits"), dict) else {}
    limit = as_float(lim.get("auc_eps_delta"))
    source = "(ε, δ) limit (probes)" if limit is not None else "(ε, δ) limit (ledger)"
    limit = limit if limit is not None else theory
    if limit is None:
        return _item("membership", "warn", f"attack AUC {fmt_num(auc)} but no DP limit (no epsilon)", auc=auc)
    lo = as_float(ci[0]) if isinstance(ci, (list, tuple)) and ci else auc
    parts = [f"{name} attack AUC {fmt_num(auc)}{_ci_text(ci)} {'≤' if auc <= limit else '>'} {fmt_num(limit, 4)}, the {source}"]
    status = "pass" if auc <= limit else ("fail" if lo > limit else "warn")
    for k, t in (r.get("tpr_at_fpr") or {}).items():
        row = (lim.get("per_fpr") or {}).get(k) or {}
        L = as_float(row.get("mechanism_pld", row.get("eps_delta")))
        tpr, tci = as_float((t or {}).get("tpr")), (t or {}).get("ci")
        if L is None or tpr is None:
            continue
        tlo = as_float(tci[0]) if isinstance(tci, (list, tuple)) and tci else tpr
        if tlo > L:
            status = "fail"
            parts.append(f"TPR at {k} FPR {fmt_num(tpr)}{_ci_text(tci)} EXCEEDS the run's DP-SGD limit {fmt_num(L)}")
    oc = mm.get("overfit_control") if isinstance(mm.get("overfit_control"), dict) else None
    if oc is not None and oc.get("caught") is False and status == "pass":
        status = "warn"
        parts.append("but the attack did not catch the non-DP overfit control, so it has little power here")
    elif oc is not None and oc.get("caught") is True:
        parts.append("the same attack catches a non-DP overfit control")
    return _item("membership", status, "; ".join(parts), auc=auc, limit=limit, limit_source=source,
                 limit_from_ledger=theory)


def _auc_value(v: Any) -> float | None:
    if isinstance(v, dict):
        return as_float(v.get("mean", v.get("value")))
    return as_float(v)


def membership_check(info: RunInfo) -> dict:
    eps, delta = info.epsilon, info.delta
    theory = membership_auc_limit(eps, delta)
    if info.probes is None:
        return _item("membership", "warn", f"{info.probes_note}: no membership-inference results "
                     f"(the DP limit would be AUC ≤ {fmt_num(theory, 4)})", limit=theory)
    explicit = _explicit_check(info.probes, "membership")
    if explicit:
        explicit["details"]["limit_from_ledger"] = theory
        return explicit
    mm = info.probes.get("membership")
    if isinstance(mm, dict) and "dp_model" in mm:
        got = _structured_membership(info, mm, theory)
        if got is not None:
            return got
    key, sec = find_section(info.probes, r"membership|(^|[._])mia($|[._])")
    if sec is None:
        return _item("membership", "warn", "the probes summary has no membership-inference section", limit=theory)
    aucs, limits = [], []
    for k, v in _iter_items(sec):
        if any(re.search(r"control|overfit|non_?dp|no_?dp|baseline", part, re.I) for part in k):
            continue  # a deliberately non-private model, there to show the attack works
        if _AUC.match(k[-1]) and _auc_value(v) is not None:
            aucs.append((".".join(k), _auc_value(v)))
        elif (_LIMIT.search(k[-1]) and "eps" not in k[-1].lower() and as_float(v) is not None
              and 0.5 <= as_float(v) <= 1.0):
            limits.append((".".join(k), as_float(v)))
    if not aucs:
        return _item("membership", "warn", f"{key}: no attack AUC found in the probes summary", limit=theory)
    name, auc = max(aucs, key=lambda a: a[1])
    if limits:
        lname, limit = min(limits, key=lambda a: a[1])
        source = f"{lname} (probes summary)"
    elif theory is not None:
        limit, source = theory, f"(ε = {fmt_num(eps, 4)}, δ = {fmt_num(delta)})-DP limit"
    else:
        return _item("membership", "warn", f"{key}: attack AUC {fmt_num(auc)} but no limit (no epsilon in the ledger)", auc=auc)
    st = "pass" if auc <= limit + 1e-12 else "fail"
    rel = "≤" if st == "pass" else ">"
    return _item("membership", st, f"attack AUC {fmt_num(auc)} ({name}) {rel} {fmt_num(limit, 4)}, the {source}",
                 auc=auc, limit=limit, limit_source=source, limit_from_ledger=theory)


def _iter_items(obj: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, value) for every key, where a value may itself be a dict like {"mean": ...}."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = path + (str(k),)
            if isinstance(v, dict) and not set(v) <= {"mean", "std", "n", "value", "ci", "ci_low", "ci_high"}:
                yield from _iter_items(v, p)
            elif isinstance(v, list):
                for i, x in enumerate(v):
                    yield from _iter_items(x, p + (str(i),))
            else:
                yield p, v


# ----------------------------------------------------------------------------- ledger checks


def preflight_check(info: RunInfo) -> dict:
    plans = info.plans
    if not plans:
        if info.privacy_note and info.privacy is None and not info.entries:
            return _item("preflight", "warn", "no privacy ledger: no DP fine-tuning recorded")
        return _item("preflight", "warn", "no DP mechanism in the ledger: nothing to preflight")
    pre = info.preflights()
    problems, good = [], []
    for mech in plans:
        p = pre.get(mech)
        if p is None:
            problems.append(f"{mech}: no preflight record")
        elif p.get("passed") is not True:
            failed = p.get("failed_parameters") or []
            problems.append(f"{mech}: preflight FAILED ({len(failed)} parameter(s), e.g. {', '.join(map(str, failed[:3]))})")
        else:
            good.append(f"{mech}: max relative error {fmt_num(p.get('max_relative_error'))} ≤ tolerance "
                        f"{fmt_num(p.get('tolerance'))} ({p.get('mode', '?')} mode)")
    if problems:
        return _item("preflight", "fail", "; ".join(problems))
    return _item("preflight", "pass", "; ".join(good))


def epsilon_check(info: RunInfo) -> dict:
    s = info.privacy
    if s is None:
        return _item("epsilon", "fail", f"no privacy accounting: {info.privacy_note}")
    eps, delta = as_float(s.get("epsilon")), as_float(s.get("delta"))
    if not s.get("mechanisms") and not s.get("releases"):
        return _item("epsilon", "pass", "no DP mechanism ran: the cohort used no private data (ε = 0)", epsilon=eps)
    if s.get("non_private") or (eps is not None and math.isinf(eps)):
        return _item("epsilon", "fail", "ε = ∞: the fine-tuning ran without noise; the cohort is NOT differentially private",
                     epsilon=eps)
    target = as_float(s.get("target_epsilon"))
    spent = f"ε = {fmt_num(eps, 4)} (PLD; RDP cross-check {fmt_num(s.get('epsilon_rdp'), 4)}) at δ = {fmt_num(delta)}, {s.get('unit')}"
    if target is None:
        return _item("epsilon", "warn", f"{spent}; the ledger states no single target", epsilon=eps)
    if s.get("within_target"):
        return _item("epsilon", "pass", f"{spent} ≤ target {fmt_num(target, 4)}", epsilon=eps, target=target)
    return _item("epsilon", "fail", f"{spent} EXCEEDS the target {fmt_num(target, 4)}", epsilon=eps, target=target)


def utility_rows(evaluation: dict | None) -> dict:
    u = (evaluation or {}).get("utility") if isinstance(evaluation, dict) else None
    rows = u.get("rows") if isinstance(u, dict) else None
    return rows if isinstance(rows, dict) else {}


def row_auc(row: dict | None) -> tuple[float | None, float | None]:
    if not isinstance(row, dict):
        return None, None
    r = row.get("roc_auc")
    if isinstance(r, dict):
        return as_float(r.get("mean")), as_float(r.get("std"))
    return as_float(r), None


def utility_check(info: RunInfo) -> dict:
    if info.evaluation is None:
        return _item("utility", "warn", f"{info.evaluation_note}: no downstream utility")
    rows = utility_rows(info.evaluation)
    syn, syn_sd = row_auc(rows.get("synthetic"))
    base, base_sd = row_auc(rows.get("dp_real"))
    if syn is None or base is None:
        missing = [n for n, v in (("synthetic (TSTR)", syn), ("dp_real (DP-SGD baseline)", base)) if v is None]
        return _item("utility", "warn", f"evaluation.json lacks the {' and '.join(missing)} row(s)")
    spread = math.sqrt((syn_sd or 0) ** 2 + (base_sd or 0) ** 2)
    d = dict(tstr_auc=syn, tstr_std=syn_sd, dp_sgd_auc=base, dp_sgd_std=base_sd)
    ceiling, _ = row_auc(rows.get("real"))
    if ceiling is not None:
        d["ceiling_auc"] = ceiling
    text = f"TSTR ROC-AUC {fmt_num(syn)} vs DP-SGD baseline {fmt_num(base)}"
    if ceiling is not None:
        text += f" (non-private ceiling {fmt_num(ceiling)})"
    if syn <= base:
        return _item("utility", "fail", f"{text}: the cohort does not beat training with DP-SGD directly", **d)
    if syn - base <= spread:
        return _item("utility", "warn", f"{text}: above, but within the seed spread (±{fmt_num(spread, 2)})", **d)
    return _item("utility", "pass", f"{text}: above the baseline by {fmt_num(syn - base, 2)}", **d)


def probe_rows(info: RunInfo, items: list[dict] | None = None) -> list[dict]:
    """The probe results next to their theoretical limits, one row each: {probe, status, result, limit}.

    status is pass/warn/fail, or "-" for a purely theoretical row. Reads dpgen.probes' layout;
    other layouts give the two checklist rows only.
    """
    items = items if items is not None else checklist(info)
    by = {i["id"]: i for i in items}
    eps, delta = info.epsilon, info.delta
    theory = membership_auc_limit(eps, delta)
    pr = info.probes if isinstance(info.probes, dict) else {}
    rows = [{"probe": "near-copies of private training images", "status": by["near_copies"]["status"],
             "result": by["near_copies"]["reason"],
             "limit": "no more near-copies than held-out real images show (DP bounds how often any one image can be copied)"},
            {"probe": "membership inference: ROC-AUC", "status": by["membership"]["status"], "result": by["membership"]["reason"],
             "limit": f"≤ {fmt_num(theory, 4)} for any attack at (ε = {fmt_num(eps, 4)}, δ = {fmt_num(delta)})"}]
    mm = pr.get("membership") if isinstance(pr.get("membership"), dict) else {}
    name, r = _primary_attack(mm) if mm else (None, None)
    lim = mm.get("dp_limits") if isinstance(mm.get("dp_limits"), dict) else {}
    for k, t in ((r or {}).get("tpr_at_fpr") or {}).items():
        row = (lim.get("per_fpr") or {}).get(k) or {}
        L, Le = as_float(row.get("mechanism_pld")), as_float(row.get("eps_delta"))
        tpr, tci = as_float((t or {}).get("tpr")), (t or {}).get("ci")
        if tpr is None:
            continue
        tlo = as_float(tci[0]) if isinstance(tci, (list, tuple)) and tci else tpr
        bound = L if L is not None else Le
        st = "-" if bound is None else ("fail" if tlo > bound else "pass" if tpr <= bound else "warn")
        rows.append({"probe": f"membership inference: TPR at {k} FPR ({name} attack)", "status": st,
                     "result": f"{fmt_num(tpr)}{_ci_text(tci)}",
                     "limit": "; ".join(x for x in (f"≤ {fmt_num(L)} (the run's DP-SGD trade-off curve, PLD)" if L is not None else "",
                                                    f"≤ {fmt_num(Le)} (ε, δ)" if Le is not None else "") if x)})
    oc = mm.get("overfit_control") if isinstance(mm.get("overfit_control"), dict) else None
    if oc:
        sc = oc.get("scores") or {}
        o = sc.get(name) or next(iter(sc.values()), {}) if isinstance(sc, dict) else {}
        rows.append({"probe": "attack power: non-DP overfit control", "status": "pass" if oc.get("caught") else "warn",
                     "result": f"AUC {fmt_num((o or {}).get('auc'))}{_ci_text((o or {}).get('auc_ci'))} on a model overfit "
                               f"without DP to {oc.get('n_images')} images ({oc.get('steps')} steps): "
                               + ("caught" if oc.get("caught") else "NOT caught"),
                     "limit": str(oc.get("caught_criterion") or "should be caught: shows the attack can detect membership")})
    b = info.bound()
    if b and isinstance(b.get("tight"), dict):
        rows.append({"probe": "reconstruction (theory, whole run)", "status": "-",
                     "result": f"bound at prior κ = {fmt_num(b['tight'].get('kappa'))}",
                     "limit": f"P[success] ≤ {fmt_num(b['tight'].get('bound'))} (tight PLD)"})
    rec = pr.get("reconstruction") if isinstance(pr.get("reconstruction"), dict) else {}
    for tname, t in (rec.get("targets") or {}).items():
        if not isinstance(t, dict):
            continue
        cond = t.get("conditions") or {}
        noisy = ((cond.get("run_noise") or {}).get("identification_by_gradient") or {})
        clean = ((cond.get("no_noise") or {}).get("identification_by_gradient") or {})
        ab = as_float((t.get("attack_bound") or {}).get("bound"))
        rate, rci = as_float(noisy.get("success_rate")), noisy.get("success_ci")
        if rate is None:
            continue
        rlo = as_float(rci[0]) if isinstance(rci, (list, tuple)) and rci else rate
        rows.append({"probe": f"reconstruction attack: {tname} (gradient matching)",
                     "status": "-" if ab is None else ("fail" if rlo > ab else "pass"),
                     "result": f"identified {fmt_num(rate)}{_ci_text(rci)} with the run's noise "
                               f"(without noise {fmt_num(clean.get('success_rate'))}; prior {fmt_num(noisy.get('prior_kappa'))})",
                     "limit": f"≤ {fmt_num(ab)} for one noisy step at that prior" if ab is not None else "-"})
    key, audit = find_section(pr, r"audit")
    if audit:
        lb = next((as_float(v) for k, v in audit.items() if "lower" in k.lower() and as_float(v) is not None), None)
        if lb is not None:
            rows.append({"probe": "DP-SGD audit: empirical ε lower bound", "status": "pass" if eps is None or lb <= eps else "fail",
                         "result": f"{fmt_num(lb)} ({key})", "limit": f"≤ claimed ε = {fmt_num(eps, 4)}"})
    return rows


def checklist(info: RunInfo) -> list[dict]:
    """The five checks, in the order of `CHECKS`."""
    return [preflight_check(info), epsilon_check(info), near_copies_check(info), membership_check(info), utility_check(info)]


def overall(items: list[dict]) -> str:
    st = {i["status"] for i in items}
    return "fail" if "fail" in st else "warn" if "warn" in st else "pass"


__all__ = ["CHECKS", "STATUSES", "checklist", "probe_rows", "overall", "membership_auc_limit", "utility_rows", "row_auc", "find_section"]
