"""`dpgen report RUN_DIR`: the release review as self-contained HTML pages (+ PDF via chromium).

    RUN/report/report.html          SHAREABLE: what may leave the institution with the cohort and
                                    nothing more: synthetic samples next to real PUBLIC examples, the
                                    privacy guarantee (dpgen.report.disclosure: no private quantity,
                                    and under add/remove neighbours not even N), how the cohort was
                                    made, the checks that depend on nothing private
    RUN/report/report.pdf           the same page printed by headless chromium, when installed
    RUN/internal/review/review.html INTERNAL (the data holder's reviewers; never shared): everything,
                                    including what is computed on private data without DP: the
                                    ledger (N, sigma, q, epsilon for both neighbouring relations,
                                    bounds of the composed mechanisms), fidelity and utility, the
                                    privacy probes, the full checklist; with --private-examples also
                                    real private images per class

Self-contained: images and plots are base64 data URIs, styles are inline, there are no scripts and
no external resources, so a file can be mailed to a reviewer and opened offline.

The shareable page reads the cohort (post-processing of DP), the public data set (public), the
config (user choices) and the ledger through dpgen.report.disclosure. It never loads the private
data, the evaluation or the probes, and it writes no local path. Checklist rows are
`<tr data-check="ID" data-status="pass|warn|fail">` so that tests (and anyone scripting a review)
can read them from the rendered DOM.
"""

from __future__ import annotations

import base64
import html
import math
import os
import shutil
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dpgen.core.naming import class_name
from dpgen.core.schemas import ConditionSummary, DPLimitRow, FidelityValue, Identification, ProbesSummary
from dpgen.report import figures
from dpgen.report.checklist import checklist, overall, shareable_checklist
from dpgen.report.disclosure import shared_privacy
from dpgen.report.runinfo import RunInfo, as_float, fmt_num, load_run
PER_CLASS = 16
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")

e = html.escape

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#1b1b1b;line-height:1.4}
h1{font-size:1.6em;margin-bottom:4px} h2{border-bottom:2px solid #ddd;padding-bottom:3px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0 16px 0;font-size:0.92em} th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
.status{font-weight:bold;text-transform:uppercase;padding:1px 6px;border-radius:3px;color:#fff}
.pass{background:#2e7d32} .warn{background:#ef8f00} .fail{background:#c62828}
.badge{font-size:1.1em} .note{color:#555;font-size:0.9em} .small{font-size:0.85em}
.samples td{text-align:center} img{max-width:100%} .grid img{image-rendering:pixelated}
.box{background:#fafafa;border:1px solid #ddd;padding:8px 14px;border-radius:4px}
.internal{background:#fff3f3;border:2px solid #c62828;padding:8px 14px}
pre{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:0.85em}
@media print{body{margin:8mm;max-width:none} h2{page-break-after:avoid} table,img{page-break-inside:avoid}}
"""


# ----------------------------------------------------------------------------- small helpers


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img_tag(png: bytes, alt: str, cls: str = "") -> str:
    return f'<img class="{cls}" alt="{e(alt)}" src="{data_uri(png)}">'


def _embed_file(info: RunInfo, rel: str) -> str | None:
    """A PNG of the run directory, for the internal review only."""
    p = (info.root / rel)
    try:
        p.resolve().relative_to(info.root.resolve())
    except ValueError:
        return None
    if not p.is_file() or p.suffix.lower() != ".png":
        return None
    return img_tag(p.read_bytes(), rel)


def _status(s: str) -> str:
    return f'<span class="status {e(s)}">{e(s)}</span>'


def _to_uint8(images: np.ndarray) -> np.ndarray:
    a = np.asarray(images)
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float64)
    lo = a.reshape(len(a), -1).min(1).reshape((-1,) + (1,) * (a.ndim - 1))
    hi = a.reshape(len(a), -1).max(1).reshape((-1,) + (1,) * (a.ndim - 1))
    return ((a - lo) / np.maximum(hi - lo, 1e-12) * 255).round().astype(np.uint8)


def _table(headers: list[str], rows: list[list[Any]], num_cols: set[int] = frozenset()) -> str:
    h = "".join(f"<th>{e(str(x))}</th>" for x in headers)
    body = []
    for r in rows:
        cells = []
        for i, x in enumerate(r):
            cls = ' class="num"' if i in num_cols else ""
            cells.append(f"<td{cls}>{x if isinstance(x, _Raw) else e(str(x))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{h}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class _Raw(str):
    """Already-escaped HTML for `_table`."""


# ----------------------------------------------------------------------------- sections


def _cohort_arrays(info: RunInfo) -> tuple[np.ndarray, np.ndarray] | None:
    from dpgen.data.medmnist import medmnist_to_channel_first

    path = info.rd.cohort_file
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        images, labels = z["train_images"], z["train_labels"]
    return medmnist_to_channel_first(images, path), np.asarray(labels).reshape(len(labels), -1)[:, 0].astype(int)


def _public_examples(info: RunInfo, n: int) -> tuple[dict[int, np.ndarray], str, str | None]:
    """Real PUBLIC examples per public label (never downloads). Returns (examples, a note fit for
    the shareable page, the detailed problem for the person running the command, or None)."""
    cfg = info.config
    if cfg is None or getattr(cfg.data, "public", None) is None:
        return {}, "no public data set in the config", None
    name = Path(str(cfg.data.public.source)).name
    try:
        from dpgen.data import load_dataset

        ds = load_dataset(cfg.data.public, download=False)
    except Exception as err:  # noqa: BLE001 - the report still renders; the detail goes to the console only
        return ({}, f"real public examples ({name}) were not available on the machine that wrote this report",
                f"public examples left out: {type(err).__name__}: {err} (set DPGEN_DATA_DIR)")
    out = {int(k): _to_uint8(ds.images[ds.labels == k][:n]) for k in np.unique(ds.labels)}
    return out, f"{name} ({ds.split} split), the public pretraining data", None


def _private_examples(info: RunInfo, n: int) -> tuple[dict[int, np.ndarray], str]:
    """INTERNAL ONLY: real private training images per class."""
    cfg = info.config
    try:
        from dpgen.data import load_dataset

        ds = load_dataset(cfg.data.private, download=False)
    except Exception as err:  # noqa: BLE001
        return {}, f"private examples unavailable: {err}"
    return ({int(k): _to_uint8(ds.images[ds.labels == k][:n]) for k in np.unique(ds.labels)},
            f"{Path(str(cfg.data.private.source)).name} ({ds.split} split): PRIVATE")


def samples_section(info: RunInfo, internal: bool, notes: list[str]) -> str:
    co = _cohort_arrays(info)
    if co is None:
        return "<p>No cohort (cohort/cohort.npz): the sample stage has not run.</p>"
    images, labels = co
    names = getattr(info.config.data, "class_names", None) if info.config else None
    public, pub_note, problem = _public_examples(info, PER_CLASS)
    if problem:
        notes.append(problem)
    private, priv_note = _private_examples(info, PER_CLASS) if internal else ({}, "")
    rows = []
    for k in sorted(np.unique(labels)):
        syn = images[labels == k][:PER_CLASS]
        cells = [f"<td><b>{e(class_name(int(k), names))}</b><br><span class='small'>{int((labels == k).sum())} synthetic</span></td>",
                 f"<td class='grid'>{img_tag(figures.grid_png(syn, ncol=8), f'synthetic class {k}', 'grid')}</td>"]
        if internal:
            pv = private.get(int(k))
            cells.append(f"<td class='grid'>{img_tag(figures.grid_png(pv, ncol=8), f'private class {k}', 'grid') if pv is not None and len(pv) else '-'}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = "<tr><th>class</th><th>synthetic (this cohort)</th>" + ("<th>real PRIVATE (internal)</th>" if internal else "") + "</tr>"
    out = [f"<table class='samples'>{head}{''.join(rows)}</table>"]
    if public:
        pub_cells = "".join(
            f"<td class='grid'><span class='small'>public label {k}</span><br>"
            f"{img_tag(figures.grid_png(v, ncol=8), f'public label {k}', 'grid')}</td>" for k, v in sorted(public.items()))
        out.append(f"<p>Real <b>public</b> examples for comparison: {e(pub_note)}. (Public labels are the public task's; "
                   f"the private images are never shown in this releasable report.)</p><table class='samples'><tr>{pub_cells}</tr></table>")
    else:
        out.append(f"<p class='note'>{e(pub_note)}</p>")
    if internal:
        out.append(f"<p class='note'>Private examples: {e(priv_note)}</p>")
    return "\n".join(out)


def shared_privacy_section(info: RunInfo) -> str:
    """The guarantee as the dataset card states it (dpgen.report.disclosure)."""
    from dpgen.report.card import privacy_markdown

    items = privacy_markdown(shared_privacy(info).to_dict())
    return "<ul>" + "".join(f"<li>{e(x.removeprefix('- ').replace('**', '').replace('`', ''))}</li>" for x in items) + "</ul>"


def internal_privacy_section(info: RunInfo) -> str:
    """Everything the ledger says, including what depends on N (internal review only)."""
    s = info.privacy
    if s is None:
        return f"<p>No privacy accounting: {e(str(info.privacy_note))}</p>"
    rows = [[f"ε ({s.neighbouring.replace('_', '/')}, the run's relation; PLD)", fmt_num(s.epsilon, 4)],
            ["ε add/remove (same events)", fmt_num(s.epsilon_add_remove, 4)],
            ["ε replace-one (same events)", fmt_num(s.epsilon_replace_one, 4)],
            ["ε (RDP cross-check)", fmt_num(s.epsilon_rdp, 4)],
            ["δ", fmt_num(s.delta)], ["budget ε", fmt_num(s.target_epsilon, 4)],
            ["unit of privacy", f"{s.unit or 'unknown'}, N = {s.n_units if s.n_units else '?'}"]]
    if s.budget_problem:
        rows.append(["PROBLEM", s.budget_problem])
    for name, m in s.mechanisms.items():
        rows.append([f"mechanism {name} [{m.scope}]",
                     f"{m.steps_done}/{m.planned_steps} steps ({'complete' if m.complete else 'IN PROGRESS'}), "
                     f"σ = {fmt_num(m.sigma, 4)}, q = {fmt_num(m.sample_rate)}, clipping C = {fmt_num(m.max_grad_norm)}, "
                     f"preflight {'passed' if m.preflight_passed else 'NOT passed'}"])
    for r in s.releases:
        rows.append([f"DP release {r.name}", f"Gaussian, noise std {fmt_num(r.event.sigma)}: composed into ε above"])
    for r in s.internal:
        rows.append([f"internal mechanism {r.mechanism}", f"{r.repeats} run(s), ε = {fmt_num(r.epsilon_each, 4)} each; "
                     f"results only in {r.outputs}, composed into nothing released"])
    b = info.bound()
    if b is not None:
        rows.append(["reconstruction bound", f"P[success] ≤ {fmt_num(b.bound.get('bound'))} at prior κ = "
                     f"{fmt_num(b.bound.get('kappa'))} (composition of {', '.join(b.mechanisms)}; tight PLD)"])
    out = [_table(["quantity", "value"], rows)]
    figs = []
    prog = sorted({(int(x["steps_done"]), as_float(x.get("epsilon_pld"))) for x in info.entries
                   if x.get("kind") == "dp_progress" and x.get("mechanism") == "dp_sgd:finetune"
                   and as_float(x.get("epsilon_pld")) is not None and math.isfinite(as_float(x.get("epsilon_pld")))})
    if prog:
        figs.append(img_tag(figures.epsilon_over_steps(prog, s.target_epsilon), "epsilon over steps"))
    if b is not None and s.events and not s.non_private:
        figs.append(img_tag(figures.bound_vs_prior(s.events, float(b.bound["kappa"]), as_float(b.bound.get("bound")),
                                                   s.neighbouring), "bound vs prior"))
    if figs:
        out.append("<table><tr>" + "".join(f"<td>{f}</td>" for f in figs) + "</tr></table>")
    return "\n".join(out)


def checklist_section(items: list[dict]) -> str:
    rows = "".join(
        f'<tr data-check="{e(i["id"])}" data-status="{e(i["status"])}"><td>{e(i["title"])}</td>'
        f'<td>{_status(i["status"])}</td><td>{e(i["reason"])}</td></tr>' for i in items)
    return (f'<table id="checklist"><thead><tr><th>check</th><th>status</th><th>why</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>")


def _sweep_points(info: RunInfo) -> tuple[list[dict], float | None, str] | None:
    """Curve points from a sweep this run belongs to (RUN/../sweep.json), if any."""
    from dpgen.report.runinfo import read_json

    from dpgen.sweep import SWEEP_JSON

    sweep, _ = read_json(info.root.parent / SWEEP_JSON, "sweep")
    if not sweep or not isinstance(sweep.get("points"), list):
        return None
    pts = [{**p, "epsilon": as_float(p.get("epsilon"))} for p in sweep["points"] if isinstance(p, dict)]
    return pts, as_float(sweep.get("ceiling_auc")), f"{info.root.parent.name}/{SWEEP_JSON}"


def _pm(mean, sd, digits: int = 2) -> str:
    return fmt_num(mean) + (f" ± {fmt_num(sd, digits)}" if sd else "")


def utility_section(info: RunInfo) -> str:
    ev = info.evaluation
    if ev is None:
        return f"<p>Not evaluated: {e(str(info.evaluation_note))} (run <code>dpgen evaluate RUN_DIR</code>).</p>"
    out = []
    if ev.rows:
        u = ev.utility
        trs = []
        for rid, r in ev.rows.items():
            mean, sd = ev.auc(rid)
            one = r.seeds_predicting_one_class
            trs.append([r.label or rid, fmt_num(r.privacy.epsilon if r.privacy else None, 4), _pm(mean, sd),
                        fmt_num(r.balanced_accuracy.mean if r.balanced_accuracy else None),
                        (f"{one} seed(s) predict one class only" if one else "")])
        out.append(f"<p>Classifiers tested on {e(str(u.test_set))}, {e(str(u.seeds))} seed(s). "
                   "The reference rows: the non-private ceiling (what real data gives without privacy) and the DP-SGD "
                   "baseline (what the same privacy budget gives without a generator).</p>")
        out.append(_table(["classifier trained on", "ε", "ROC-AUC", "balanced acc.", "note"], trs, {1, 2, 3}))
    fid = ev.fidelity
    if fid is not None and fid.overall is not None:
        o = fid.overall
        fx = fid.feature_extractor
        spaces = [x for x in (fx, *fid.other_feature_spaces) if x is not None]
        out.append("<h3>Fidelity</h3><p>Features: "
                   + "; ".join(f"{e(str(x.name))} — {e(str(x.description or '').rstrip('.'))}" for x in spaces) + ". "
                   f"Cohort vs {e(str(fid.real_set))}; reference: {e(str(fid.reference_set))}; "
                   f"n matched = {e(str(o.n_matched))}.</p>")
        groups = {"all": o, **{f"class {c}": v for c, v in fid.per_class.items()}}
        trs = []
        for m in o.metrics:
            for g, gv in groups.items():
                v = gv.metrics.get(m) or FidelityValue()
                trs.append([m, g, _pm(v.cohort, v.cohort_std), _pm(v.real_vs_real, v.real_vs_real_std), v.better or ""])
        out.append(_table(["metric", "group", "cohort", "real vs real (reference)", "better"], trs, {2, 3}))
    if ev.privacy_note:
        out.append(f"<p class='note'>{e(ev.privacy_note)}</p>")
    figs = [f for rel in ev.figures for f in [_embed_file(info, rel)] if f]
    out.extend(f"<p>{f}</p>" for f in figs)
    return "\n".join(out)


def curve_section(info: RunInfo) -> str:
    sweep = _sweep_points(info)
    if sweep is not None:
        pts, ceiling, where = sweep
        return (f"<p>From the privacy-utility sweep this run belongs to ({e(where)}).</p>"
                + img_tag(figures.privacy_utility_curve(pts, ceiling), "privacy-utility curve"))
    ev = info.evaluation
    if ev is None:
        return "<p>No evaluation yet: no privacy-utility plot.</p>"
    pts = []
    for rid, key in (("synthetic", "tstr_auc"), ("dp_real", "dp_sgd_auc"), ("synthetic_then_dp_real", "ft_auc")):
        mean, sd = ev.auc(rid)
        r = ev.rows.get(rid)
        eps = r.privacy.epsilon if r is not None and r.privacy is not None else None
        if mean is not None and eps is not None:
            pts.append({"epsilon": eps, key: mean, key.replace("_auc", "_std"): sd})
    ceiling, _ = ev.auc("real")
    if not pts:
        return "<p>The evaluation has no utility rows: no privacy-utility plot.</p>"
    return ("<p>This run's utility rows at their own epsilons (run <code>dpgen sweep</code> for the full curve).</p>"
            + img_tag(figures.privacy_utility_curve(pts, ceiling), "privacy-utility points"))


def probe_rows(info: RunInfo) -> list[list]:
    """The probe results next to their limits (dpgen.core.schemas.ProbesSummary), one row each."""
    pr = info.probes or ProbesSummary()
    rows = []
    mm = pr.membership
    name, r = mm.primary() if mm is not None else (None, None)
    if mm is not None and r is not None:
        lim = mm.dp_limits
        for k, t in r.tpr_at_fpr.items():
            row = lim.per_fpr.get(k) or DPLimitRow()
            ci_s = f" [{fmt_num(t.ci[0])}, {fmt_num(t.ci[1])}]" if t.ci and len(t.ci) == 2 else ""
            rows.append([f"membership inference: TPR at {k} FPR ({name} attack)", f"{fmt_num(t.tpr)}{ci_s}",
                         f"≤ {fmt_num(row.mechanism_pld)} (composed mechanisms' trade-off curve); ≤ "
                         f"{fmt_num(row.eps_delta)} from (ε, δ) alone"])
        rows.append([f"membership inference: ROC-AUC ({name} attack)", fmt_num(r.auc),
                     f"≤ {fmt_num(lim.auc_eps_delta, 4)} from (ε, δ) alone"])
    oc = mm.overfit_control if mm is not None else None
    if oc is not None:
        o = oc.scores.get(name)
        rows.append(["attack power: non-DP overfit control", f"AUC {fmt_num(o.auc if o else None)} on a model overfit "
                     f"without DP to {oc.n_images} images: {'caught' if oc.caught else 'NOT caught'}",
                     str(oc.caught_criterion or "")])
    for tname, t in (pr.reconstruction.targets if pr.reconstruction else {}).items():
        noisy = (t.conditions.get("run_noise") or ConditionSummary()).identification_by_gradient or Identification()
        clean = (t.conditions.get("no_noise") or ConditionSummary()).identification_by_gradient or Identification()
        ab = t.attack_bound.bound if t.attack_bound else None
        rows.append([f"reconstruction attack: {tname}", f"identified {fmt_num(noisy.success_rate)} with the run's "
                     f"noise (without noise {fmt_num(clean.success_rate)}; prior "
                     f"{fmt_num(noisy.prior_kappa)})", f"≤ {fmt_num(ab)} for one noisy step at that prior"])
    return rows


def probes_section(info: RunInfo) -> str:
    if info.probes is None:
        return f"<p>Probes: {e(str(info.probes_note))} (run <code>dpgen audit RUN_DIR</code>).</p>"
    out = [_table(["probe", "result", "limit / reference"], probe_rows(info))]
    if info.probes.privacy_note:
        out.append(f"<p class='note'>{e(info.probes.privacy_note)}</p>")
    return "\n".join(out)


def internal_figures_section(info: RunInfo) -> str:
    figs = [img_tag(p.read_bytes(), str(p.relative_to(info.root))) for p in sorted(info.rd.internal.rglob("*.png"))]
    return "".join(f"<p class='small'>{f}</p>" for f in figs) or "<p>No internal figures.</p>"


def ledger_section(info: RunInfo) -> str:
    from dpgen.privacy.ledger import format_ledger

    if info.privacy is None:
        return "<p>No ledger summary.</p>"
    text = format_ledger(info.privacy).replace(str(info.root), "RUN")
    return f"<pre>{e(text)}</pre>"


def _page(title: str, body: list[str]) -> str:
    return "\n".join([
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">",
        f"<style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>", *body, "</body></html>"])


def _made_by(info: RunInfo) -> str:
    versions = (info.manifest or {}).get("versions") or {}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return f"<p class='note'>Generated {e(now)} by dpgen {e(str(versions.get('dpgen', '?')))}.</p>"


def render_shareable(info: RunInfo, notes: list[str] | None = None) -> str:
    """The shareable release review: nothing computed on private data without DP, no local path.
    Problems worth telling the person running the command (not the reader) go into `notes`."""
    from dpgen.report.card import how_it_was_made, known_limits

    notes = [] if notes is None else notes
    items = shareable_checklist(info)
    shared = shared_privacy(info)
    co = _cohort_arrays(info)
    body = [_made_by(info),
            f"<div class='box'><p class='badge'>Checklist: {_status(overall(items))}</p>"
            f"<p>Privacy: <b>{e(shared.meaning)}</b>.</p>"
            + (f"<p>Cohort: {len(co[1])} synthetic images.</p>" if co is not None else "") + "</div>",
            "<h2 id='checklist-heading'>Checklist</h2>", checklist_section(items),
            "<p class='note'>Only the checks whose answers depend on nothing private. The data holder's internal "
            "review (near-copies, membership inference, fidelity, utility) is computed on private data without DP "
            "and is not shared.</p>",
            "<h2>Privacy guarantee</h2>", shared_privacy_section(info),
            "<h2>Samples</h2>", samples_section(info, False, notes)]
    h = how_it_was_made(info)
    pt = h["public_pretraining"]
    made = [["generator", f"{h['generator']['family']} (channels {h['generator']['channels']})"],
            ["public pretraining", f"{pt['data']} ({pt['split']} split), {pt['steps']} steps"
             + (f"; caveat: {pt['caveat']}" if pt.get("caveat") else "")],
            ["DP fine-tuning", f"{h['dp_finetuning']['data']}: {h['dp_finetuning']['algorithm']}"],
            ["sampling", f"{h['sampling']['sampler']}, {h['sampling']['steps']} steps; class counts: "
                         f"{h['sampling']['class_counts']}"]]
    body += ["<h2>How it was made</h2>", _table(["", ""], made)]
    cohort = {"n": len(co[1]) if co is not None else 0}
    body += ["<h2>Known limits</h2>", "<ul>" + "".join(f"<li>{e(x)}</li>" for x in known_limits(info, cohort)) + "</ul>",
             "<p class='note'>This page shows no private image and no statistic of the private data: samples are "
             "synthetic, comparisons use public data, and the privacy statement follows dpgen.report.disclosure.</p>"]
    return _page(f"dpgen release review: {info.name}", body)


def render_internal(info: RunInfo, private_examples: bool = False) -> str:
    """The data holder's internal review: everything, including statistics of private data."""
    items = checklist(info)
    body = [_made_by(info),
            "<div class='internal'><b>INTERNAL: computed on private data without DP"
            + (", and showing real private images" if private_examples else "")
            + ". Never share this page.</b> The shareable version is report/report.html.</div>",
            f"<div class='box'><p class='badge'>Checklist: {_status(overall(items))}</p></div>",
            "<h2 id='checklist-heading'>Checklist</h2>", checklist_section(items),
            "<p class='note'>pass: the check holds; warn: not run, or inconclusive; fail: the check does not hold. "
            "See the README, \"Release review: how to read it\".</p>",
            "<h2>Privacy accounting (ledger)</h2>", internal_privacy_section(info),
            "<h2>What the shareable outputs state</h2>", shared_privacy_section(info),
            "<h2>Samples</h2>", samples_section(info, private_examples, []),
            "<h2>Privacy-utility</h2>", curve_section(info),
            "<h2>Utility and fidelity</h2>", utility_section(info),
            "<h2>Probes and their limits</h2>", probes_section(info),
            "<h2>Internal figures</h2>", internal_figures_section(info),
            "<h2>Privacy ledger</h2>", ledger_section(info)]
    return _page(f"dpgen INTERNAL release review: {info.name}", body)


# ----------------------------------------------------------------------------- chromium


def find_chromium() -> str | None:
    env = os.environ.get("DPGEN_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in CHROMIUM_NAMES:
        p = shutil.which(name)
        if p:
            return p
    return None


def chromium(args: list[str], url: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run headless chromium once on `url` with a throwaway profile (no network features)."""
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed")
    with tempfile.TemporaryDirectory(prefix="dpgen-chromium-") as profile:
        cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def print_pdf(html_path: Path, pdf_path: Path, timeout: float = 120) -> tuple[bool, str]:
    if find_chromium() is None:
        return False, "PDF skipped: chromium not installed (apt-get install chromium)"
    pdf_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pdf_path.with_name(f".{pdf_path.name}.tmp.pdf")
    try:
        res = chromium(["--no-pdf-header-footer", f"--print-to-pdf={tmp}"], html_path.resolve().as_uri(), timeout)
    except (subprocess.TimeoutExpired, OSError) as err:
        return False, f"PDF failed: {type(err).__name__}: {err}"
    if not tmp.is_file() or tmp.stat().st_size == 0:
        return False, f"PDF failed: chromium exited {res.returncode}: {res.stderr.strip()[-300:]}"
    os.replace(tmp, pdf_path)
    return True, f"PDF: {pdf_path}"


def write_report(run_dir: str | Path, *, pdf: bool = True, private_examples: bool = False) -> dict:
    """Write RUN/report/report.html (+ .pdf) and RUN/internal/review/review.html."""
    from dpgen.rundir import write_text_atomic

    info = load_run(run_dir)
    if info.federated:
        from dpgen.report.release import ReleaseError

        raise ReleaseError(f"{info.root} is a federated coordinator's run directory: `dpgen report` covers one data "
                           f"holder's run. Its shareable output is `dpgen release {info.root} OUT` (the dataset card "
                           f"states the per-site guarantees); `dpgen federated report {info.root}` prints them. Each "
                           f"site can review its own run directory with `dpgen privacy report SITE_DIR`")
    rd = info.rd
    notes: list[str] = []
    out = {"html": str(rd.report_html), "internal_html": str(rd.review_html),
           "shareable_checklist": shareable_checklist(info), "checklist": checklist(info)}
    out["overall"] = overall(out["checklist"])
    write_text_atomic(rd.report_html, render_shareable(info, notes))
    write_text_atomic(rd.review_html, render_internal(info, private_examples=private_examples))
    if pdf:
        pdf_path = rd.report_html.with_suffix(".pdf")
        ok, note = print_pdf(rd.report_html, pdf_path)
        out["pdf"] = str(pdf_path) if ok else None
        out["pdf_note"] = note
    else:
        out["pdf"], out["pdf_note"] = None, "PDF not requested (--no-pdf)"
    out["notes"] = notes
    return out


def format_report(result: dict) -> str:
    lines = [f"shareable release review: {result['html']}", result.get("pdf_note") or "",
             f"internal review (never share): {result['internal_html']}", *result.get("notes", []),
             f"internal checklist: {result['overall'].upper()}"]
    for i in result["checklist"]:
        lines.append(f"  [{i['status'].upper():4}] {i['title']}: {i['reason']}")
    return "\n".join(x for x in lines if x)


__all__ = ["render_shareable", "render_internal", "write_report", "format_report", "find_chromium", "chromium",
           "print_pdf", "CHROMIUM_FLAGS"]
