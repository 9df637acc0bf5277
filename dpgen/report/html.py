"""`dpgen report RUN_DIR`: the release review as one self-contained HTML page (+ PDF via chromium).

    RUN/report/report.html   releasable: synthetic samples next to real PUBLIC examples, the
                             privacy-utility plots, fidelity and utility tables with their references,
                             probe results next to their theoretical limits, the checklist
    RUN/report/report.pdf    the same page printed by headless chromium, when chromium is installed
    RUN/internal/report_internal.html   only with --internal: adds real PRIVATE examples per class and
                             the internal figures (never released; lives under internal/)

Self-contained: images and plots are base64 data URIs, styles are inline, there are no scripts and
no external resources, so the file can be mailed to a reviewer and opened offline.

The releasable page reads: the cohort (post-processing of DP), the public data set (public), the
ledger, and the aggregate metrics files. It never loads the private data; only the internal page
does (`_private_examples`). Figures under internal/ are refused by `_embed_file` unless internal.

Checklist rows are `<tr data-check="ID" data-status="pass|warn|fail">` so that tests (and anyone
scripting a review) can read them from the rendered DOM.
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

from dpgen.report import figures
from dpgen.report.checklist import checklist, membership_auc_limit, overall, probe_rows, row_auc, utility_rows
from dpgen.report.runinfo import COHORT_FILE, RunInfo, as_float, fmt_num, load_run

REPORT_DIR = Path("report")
REPORT_HTML = REPORT_DIR / "report.html"
REPORT_PDF = REPORT_DIR / "report.pdf"
INTERNAL_HTML = Path("internal") / "report_internal.html"
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


def _embed_file(info: RunInfo, rel: str, internal: bool) -> str | None:
    p = (info.root / rel)
    try:
        parts = p.resolve().relative_to(info.root.resolve()).parts
    except ValueError:
        return None
    if parts and parts[0] == "internal" and not internal:
        return None  # an internal figure never goes into the releasable report
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


def _class_name(k: int, names) -> str:
    return names[k] if names and 0 <= k < len(names) else str(k)


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

    path = info.root / COHORT_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        images, labels = z["train_images"], z["train_labels"]
    return medmnist_to_channel_first(images, path), np.asarray(labels).reshape(len(labels), -1)[:, 0].astype(int)


def _public_examples(info: RunInfo, n: int) -> tuple[dict[int, np.ndarray], str]:
    """Real PUBLIC examples per public label (never downloads; a note instead when unavailable)."""
    cfg = info.config
    if cfg is None or getattr(cfg.data, "public", None) is None:
        return {}, "no public data set in the config"
    try:
        from dpgen.data import load_dataset

        ds = load_dataset(cfg.data.public, download=False)
    except Exception as err:  # noqa: BLE001 - the report still renders
        return {}, f"public examples unavailable: {type(err).__name__}: {err}"
    out = {int(k): _to_uint8(ds.images[ds.labels == k][:n]) for k in np.unique(ds.labels)}
    return out, f"{Path(str(cfg.data.public.source)).name} ({ds.split} split), the public pretraining data"


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


def samples_section(info: RunInfo, internal: bool) -> str:
    co = _cohort_arrays(info)
    if co is None:
        return "<p>No cohort (cohort/cohort.npz): the sample stage has not run.</p>"
    images, labels = co
    names = getattr(info.config.data, "class_names", None) if info.config else None
    public, pub_note = _public_examples(info, PER_CLASS)
    private, priv_note = _private_examples(info, PER_CLASS) if internal else ({}, "")
    rows = []
    for k in sorted(np.unique(labels)):
        syn = images[labels == k][:PER_CLASS]
        cells = [f"<td><b>{e(_class_name(int(k), names))}</b><br><span class='small'>{int((labels == k).sum())} synthetic</span></td>",
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


def privacy_section(info: RunInfo) -> str:
    s = info.privacy
    if s is None:
        return f"<p>No privacy accounting: {e(str(info.privacy_note))}</p>"
    eps, delta = as_float(s.get("epsilon")), as_float(s.get("delta"))
    rows = [["ε (PLD accountant)", fmt_num(eps, 4)], ["ε (RDP cross-check)", fmt_num(s.get("epsilon_rdp"), 4)],
            ["δ", fmt_num(delta)], ["target ε", fmt_num(s.get("target_epsilon"), 4)],
            ["unit of privacy", s.get("unit") or "unknown"]]
    for name, m in (s.get("mechanisms") or {}).items():
        rows.append([f"mechanism {name}", f"{m.get('steps_done')}/{m.get('planned_steps')} steps "
                     f"({'complete' if m.get('complete') else 'IN PROGRESS'}), σ = {fmt_num(m.get('sigma'), 4)}, "
                     f"q = {fmt_num(m.get('sample_rate'))}, clipping C = {fmt_num(m.get('max_grad_norm'))}"])
    for r in s.get("releases") or []:
        rows.append([f"DP release {r.get('name')}", "composed into ε above"])
    b = info.bound()
    if b and isinstance(b.get("tight"), dict):
        t, g = b["tight"], b.get("gdp") or {}
        rows.append(["reconstruction bound", f"P[success] ≤ {fmt_num(t.get('bound'))} at prior κ = {fmt_num(t.get('kappa'))} "
                     f"(tight PLD); Gaussian-DP approximation {fmt_num(g.get('bound'))}"])
    rows.append(["membership AUC limit", f"{fmt_num(membership_auc_limit(eps, delta), 4)}: no membership test can do better at this (ε, δ)"])
    out = [_table(["quantity", "value"], rows)]
    figs = []
    prog = sorted({(int(x["steps_done"]), as_float(x.get("epsilon_pld"))) for x in info.all("dp_progress")
                   if x.get("steps_done") is not None and as_float(x.get("epsilon_pld")) is not None
                   and math.isfinite(as_float(x.get("epsilon_pld")))})
    if prog:
        figs.append(img_tag(figures.epsilon_over_steps(prog, as_float(s.get("target_epsilon"))), "epsilon over steps"))
    if b and isinstance(b.get("tight"), dict):
        t = b["tight"]
        try:
            figs.append(img_tag(figures.bound_vs_prior(float(t["sigma"]), float(t["sample_rate"]), int(t["steps"]),
                                                       float(t["kappa"]), as_float(t.get("bound"))), "bound vs prior"))
        except (KeyError, TypeError, ValueError):
            pass
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

    sweep, _ = read_json(info.root.parent / "sweep.json", "sweep")
    if not sweep or not isinstance(sweep.get("points"), list):
        return None
    pts = [{**p, "epsilon": as_float(p.get("epsilon"))} for p in sweep["points"] if isinstance(p, dict)]
    return pts, as_float(sweep.get("ceiling_auc")), f"{info.root.parent.name}/sweep.json"


def utility_section(info: RunInfo) -> str:
    ev = info.evaluation
    if ev is None:
        return f"<p>Not evaluated: {e(str(info.evaluation_note))} (run <code>dpgen evaluate RUN_DIR</code>).</p>"
    out = []
    rows = utility_rows(ev)
    if rows:
        u = ev.get("utility") or {}
        trs = []
        for rid, r in rows.items():
            mean, sd = row_auc(r)
            priv = r.get("privacy") if isinstance(r.get("privacy"), dict) else {}
            bacc = (r.get("balanced_accuracy") or {}) if isinstance(r.get("balanced_accuracy"), dict) else {}
            one = r.get("seeds_predicting_one_class")
            trs.append([r.get("label", rid), fmt_num(priv.get("epsilon"), 4),
                        f"{fmt_num(mean)}" + (f" ± {fmt_num(sd, 2)}" if sd else ""), fmt_num(bacc.get("mean")),
                        (f"{one} seed(s) predict one class only" if one else "")])
        out.append(f"<p>Classifiers tested on {e(str(u.get('test_set')))}, {e(str(u.get('seeds')))} seed(s). "
                   "The reference rows: the non-private ceiling (what real data gives without privacy) and the DP-SGD "
                   "baseline (what the same privacy budget gives without a generator).</p>")
        out.append(_table(["classifier trained on", "ε", "ROC-AUC", "balanced acc.", "note"], trs, {1, 2, 3}))
    fid = ev.get("fidelity") if isinstance(ev.get("fidelity"), dict) else None
    if fid:
        o = fid.get("overall") or {}
        fx = fid.get("feature_extractor") or {}
        out.append(f"<h3>Fidelity</h3><p>Features: {e(str(fx.get('name')))} — {e(str(fx.get('description', '')).rstrip('.'))}. "
                   f"Cohort vs {e(str(fid.get('real_set')))}; reference: {e(str(fid.get('reference_set')))}; "
                   f"n matched = {e(str(o.get('n_matched')))}.</p>")
        groups = {"all": o, **{f"class {c}": v for c, v in (fid.get("per_class") or {}).items()}}
        trs = []
        for m in (o.get("metrics") or {}):
            for g, gv in groups.items():
                v = ((gv or {}).get("metrics") or {}).get(m) or {}
                trs.append([m, g, fmt_num(v.get("cohort")) + (f" ± {fmt_num(v.get('cohort_std'), 2)}" if as_float(v.get("cohort_std")) else ""),
                            fmt_num(v.get("real_vs_real")) + (f" ± {fmt_num(v.get('real_vs_real_std'), 2)}" if as_float(v.get("real_vs_real_std")) else ""),
                            v.get("better", "")])
        out.append(_table(["metric", "group", "cohort", "real vs real (reference)", "better"], trs, {2, 3}))
    if ev.get("privacy_note"):
        out.append(f"<p class='note'>{e(str(ev['privacy_note']))}</p>")
    figs = [f for rel in (ev.get("figures") or []) if isinstance(rel, str) for f in [_embed_file(info, rel, False)] if f]
    out.extend(f"<p>{f}</p>" for f in figs)
    return "\n".join(out)


def curve_section(info: RunInfo) -> str:
    sweep = _sweep_points(info)
    if sweep is not None:
        pts, ceiling, where = sweep
        return (f"<p>From the privacy-utility sweep this run belongs to ({e(where)}).</p>"
                + img_tag(figures.privacy_utility_curve(pts, ceiling), "privacy-utility curve"))
    if info.evaluation is None:
        return "<p>No evaluation yet: no privacy-utility plot.</p>"
    rows = utility_rows(info.evaluation)
    pts = []
    for rid, key in (("synthetic", "tstr_auc"), ("dp_real", "dp_sgd_auc"), ("synthetic_then_dp_real", "ft_auc")):
        r = rows.get(rid)
        mean, sd = row_auc(r)
        eps = as_float(((r or {}).get("privacy") or {}).get("epsilon"))
        if mean is not None and eps is not None:
            pts.append({"epsilon": eps, key: mean, key.replace("_auc", "_std"): sd})
    ceiling, _ = row_auc(rows.get("real"))
    if not pts:
        return "<p>The evaluation has no utility rows: no privacy-utility plot.</p>"
    return ("<p>This run's utility rows at their own epsilons (run <code>dpgen sweep</code> for the full curve).</p>"
            + img_tag(figures.privacy_utility_curve(pts, ceiling), "privacy-utility points"))


def probes_section(info: RunInfo, items: list[dict], internal: bool) -> str:
    rows = [[r["probe"], _Raw(_status(r["status"])) if r["status"] in ("pass", "warn", "fail") else r["status"],
             r["result"], r["limit"]] for r in probe_rows(info, items)]
    out = [_table(["probe", "status", "result", "theoretical limit / reference"], rows)]
    if info.probes is None:
        out.append(f"<p class='note'>Probes: {e(str(info.probes_note))} (run <code>dpgen audit RUN_DIR</code>).</p>")
    elif info.probes.get("contains_private_images") is not False:
        out.append("<p class='note'>probes_summary.json does not declare \"contains_private_images\": false; its fields are not shown.</p>")
    else:
        from dpgen.report.card import _scalars

        if info.probes.get("privacy_note"):
            out.append(f"<p class='note'>{e(str(info.probes['privacy_note']))}</p>")
        fields = [[k, fmt_num(v, 4) if isinstance(v, float) else v] for k, v in _scalars(info.probes).items()
                  if k != "privacy_note"]
        out.append(f"<details><summary>all {len(fields)} aggregate fields of metrics/probes_summary.json</summary>"
                   + _table(["field", "value"], fields) + "</details>")
        figs = [f for rel in (info.probes.get("figures") or []) if isinstance(rel, str)
                and (internal or not rel.startswith("internal/")) for f in [_embed_file(info, rel, internal)] if f]
        out.extend(f"<p>{f}</p>" for f in figs)
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


def render(info: RunInfo, internal: bool = False) -> str:
    items = checklist(info)
    verdict = overall(items)
    cfg = info.config
    versions = (info.manifest or {}).get("versions") or {}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    title = f"dpgen release review: {info.name}" + (" (INTERNAL)" if internal else "")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
             "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">",
             f"<style>{CSS}</style></head><body>",
             f"<h1>{e(title)}</h1>",
             f"<p class='note'>Generated {e(now)} by dpgen {e(str(versions.get('dpgen', '?')))}"
             f" from run <code>{e(info.root.name)}</code>.</p>"]
    if internal:
        parts.append("<div class='internal'><b>INTERNAL: this page shows real private images. Never share it.</b> "
                     "The releasable version is report/report.html.</div>")
    s = info.privacy or {}
    parts.append(
        f"<div class='box'><p class='badge'>Release checklist: {_status(verdict)}</p>"
        f"<p>Privacy: <b>ε = {e(fmt_num(s.get('epsilon'), 4))}</b>, δ = {e(fmt_num(s.get('delta')))}, "
        f"{e(str(s.get('unit') or 'unit unknown'))}"
        + (f"; cohort of {e(str(len(_cohort_arrays(info)[1])))} synthetic images" if (info.root / COHORT_FILE).is_file() else "")
        + (f"; {e(str(getattr(cfg.data, 'num_classes', '?')))} classes" if cfg else "") + ".</p></div>")
    parts += ["<h2 id='checklist-heading'>Checklist</h2>", checklist_section(items),
              "<p class='note'>pass: the check holds; warn: not run, or inconclusive; fail: the check does not hold. "
              "See the README, \"Release review: how to read it\".</p>"]
    parts += ["<h2>Privacy guarantee</h2>", privacy_section(info)]
    parts += ["<h2>Samples</h2>", samples_section(info, internal)]
    parts += ["<h2>Privacy-utility</h2>", curve_section(info)]
    parts += ["<h2>Utility and fidelity</h2>", utility_section(info)]
    parts += ["<h2>Probes and theoretical limits</h2>", probes_section(info, items, internal)]
    if internal:
        parts += ["<h2>Internal figures</h2>", internal_figures_section(info)]
    parts += ["<h2>Privacy ledger</h2>", ledger_section(info)]
    parts.append("<p class='note'>" + ("This internal page contains private images." if internal else
                 "This releasable page shows no private image: samples are synthetic, comparisons use public data, "
                 "and metrics are aggregates.") + "</p></body></html>")
    return "\n".join(parts)


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


def write_report(run_dir: str | Path, *, pdf: bool = True, internal: bool = False) -> dict:
    """Write RUN/report/report.html (+ .pdf); with `internal`, also RUN/internal/report_internal.html."""
    from dpgen.rundir import write_text_atomic

    info = load_run(run_dir)
    out = {"html": str(info.root / REPORT_HTML), "checklist": checklist(info)}
    out["overall"] = overall(out["checklist"])
    write_text_atomic(info.root / REPORT_HTML, render(info, internal=False))
    if pdf:
        ok, note = print_pdf(info.root / REPORT_HTML, info.root / REPORT_PDF)
        out["pdf"] = str(info.root / REPORT_PDF) if ok else None
        out["pdf_note"] = note
    else:
        out["pdf"], out["pdf_note"] = None, "PDF not requested (--no-pdf)"
    if internal:
        write_text_atomic(info.root / INTERNAL_HTML, render(info, internal=True))
        out["internal_html"] = str(info.root / INTERNAL_HTML)
    return out


def format_report(result: dict) -> str:
    lines = [f"release review: {result['html']}", result.get("pdf_note") or ""]
    if result.get("internal_html"):
        lines.append(f"internal version (private images; never share): {result['internal_html']}")
    lines.append(f"checklist: {result['overall'].upper()}")
    for i in result["checklist"]:
        lines.append(f"  [{i['status'].upper():4}] {i['title']}: {i['reason']}")
    return "\n".join(x for x in lines if x)


__all__ = ["render", "write_report", "format_report", "find_chromium", "chromium", "print_pdf", "REPORT_HTML", "REPORT_PDF",
           "INTERNAL_HTML", "CHROMIUM_FLAGS"]
