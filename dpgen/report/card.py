"""The dataset card of a release bundle (JSON for machines, Markdown for people).

It answers the three questions of every release (see DESIGN.md): what the privacy guarantee is
(epsilon, delta, unit, reconstruction bound), whether it holds in practice (probes), and what the
cohort buys its user (utility next to its baselines, fidelity next to real-vs-real references);
then intended uses, known limits, the release checklist and what was left out of the bundle.

Only aggregate numbers are quoted: the headline rows of RUN/metrics/evaluation.json and the
scalar fields of RUN/metrics/probes_summary.json (only when that file declares
"contains_private_images": false). No per-image value of the private data is ever copied.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dpgen.report.checklist import membership_auc_limit, probe_rows, row_auc, utility_rows
from dpgen.report.release import CHECKSUMS, summarize_left_out
from dpgen.report.runinfo import RunInfo, as_float, fmt_num

CARD_VERSION = 1
MAX_PROBE_FIELDS = 80


def _name(source: str | None) -> str | None:
    """A data source as a name (a MedMNIST name, or a path's last component), never a full path."""
    if not source:
        return None
    return Path(str(source)).name


def _finite(v: Any) -> Any:
    f = as_float(v)
    if f is None:
        return v
    return f if math.isfinite(f) else ("inf" if f > 0 else "-inf" if f < 0 else "nan")


def _get(obj: Any, dotted: str, default: Any = None) -> Any:
    """config.a.b.c, or `default` when a section or field does not exist (configs grow new generator families)."""
    for part in dotted.split("."):
        obj = getattr(obj, part, None) if not isinstance(obj, dict) else obj.get(part)
        if obj is None:
            return default
    return obj


def how_it_was_made(info: RunInfo) -> dict:
    c = info.config
    plan = next(iter(info.plans.values()), {})
    cohort = info.latest("artifact", name="cohort") or {}
    versions = (info.manifest or {}).get("versions") or {}
    generator = str(_get(c, "model.generator", "generator"))
    channels = _get(c, "model.channels")
    timesteps = _get(c, "model.num_train_timesteps")
    desc = f"class-conditional {generator}"
    if generator == "diffusion":
        desc += " (MONAI DiffusionModelUNet"
        desc += f", channels {list(channels)}" if channels else ""
        desc += f", {timesteps} diffusion timesteps)" if timesteps else ")"
    public = _get(c, "data.public.source")
    return {
        "generator": desc,
        "public_pretraining": {"data": _name(public), "steps": _get(c, "pretrain.steps"),
                               "batch_size": _get(c, "pretrain.batch_size"),
                               "privacy": "public data only: no privacy cost" if public else "no public data"},
        "dp_finetuning": {
            "data": f"the private data ({_name(_get(c, 'data.private.source'))})",
            "algorithm": "DP-SGD (Opacus per-sample gradients, clipping, Gaussian noise; Poisson sampling)",
            "steps": plan.get("planned_steps", _get(c, "finetune.steps")),
            "expected_batch_size": plan.get("expected_batch_size", _get(c, "finetune.batch_size")),
            "max_grad_norm": plan.get("max_grad_norm", _get(c, "finetune.max_grad_norm")),
            "noise_multiplicity": plan.get("noise_multiplicity", _get(c, "finetune.noise_multiplicity")),
            "lr": _get(c, "finetune.lr"), "grad_sample_mode": plan.get("grad_sample_mode", _get(c, "finetune.grad_sample_mode")),
            "noise_multiplier_sigma": _finite(plan.get("sigma")), "sample_rate": _finite(plan.get("sample_rate")),
            "accountant": plan.get("accountant", _get(c, "privacy.accountant")),
        },
        "sampling": {"sampler": _get(c, "sample.sampler"), "steps": _get(c, "sample.steps"),
                     "guidance_scale": _get(c, "sample.guidance_scale"), "seed": _get(c, "sample.seed"),
                     "class_counts": _get(c, "sample.class_counts.mode"),
                     "class_counts_source": cohort.get("class_counts_source")},
        "software": {"dpgen": versions.get("dpgen"), "torch": versions.get("torch"), "opacus": versions.get("opacus"),
                     "monai": versions.get("monai"), "git_commit": (info.manifest or {}).get("git_commit")},
        "run_name": info.name,
        **({"config_note": info.config_note} if info.config_note else {}),
    }


def privacy_section(info: RunInfo) -> dict:
    s = info.privacy or {}
    eps, delta = as_float(s.get("epsilon")), as_float(s.get("delta"))
    b = info.bound()
    bound = None
    if b and isinstance(b.get("tight"), dict):
        t, g = b["tight"], b.get("gdp") or {}
        bound = {"bound": t.get("bound"), "method": t.get("method", "tight"), "kappa": t.get("kappa"),
                 "gdp_bound": g.get("bound"), "unit": b.get("unit"),
                 "meaning": (f"an attacker who knows everything except one {str(b.get('unit') or 'unit').removeprefix('per ')} "
                             f"and would guess it with prior probability κ = {fmt_num(t.get('kappa'))} "
                             f"succeeds at reconstructing it with probability at most {fmt_num(t.get('bound'))} "
                             "(Hayes et al. 2023; certified numerical bound from the PLD trade-off curve)")}
    releases = [{"name": r.get("name"), "epsilon": _finite(r.get("epsilon")), "values": e.get("values")}
                for r in s.get("releases") or [] for e in [info.latest("dp_release", name=r.get("name")) or {}]]
    unit = s.get("unit") or "unknown"
    return {
        "epsilon": _finite(eps), "epsilon_rdp": _finite(s.get("epsilon_rdp")), "delta": delta,
        "accountant": "PLD (dp-accounting), cross-checked with RDP", "target_epsilon": _finite(s.get("target_epsilon")),
        "within_target": s.get("within_target"), "unit": unit,
        "unit_meaning": ("one patient: all of a subject's images together are protected" if unit == "per subject"
                         else "one image: a patient with several images is protected less than epsilon suggests"
                         if unit == "per image" else unit),
        "meaning": (f"({fmt_num(eps, 4)}, {fmt_num(delta)})-differential privacy {unit}: adding or removing one "
                    f"{unit.removeprefix('per ')} from the private training data changes the probability of any "
                    f"outcome (this cohort included) by at most a factor e^ε = {fmt_num(math.exp(min(eps, 700)), 4)}, "
                    f"except with probability δ" if eps is not None and math.isfinite(eps) else
                    "NOT differentially private"),
        "dp_releases": releases,
        "reconstruction_bound": bound,
        "membership_auc_limit": membership_auc_limit(eps, delta),
    }


def _scalars(obj: Any, prefix: str = "", out: dict | None = None) -> dict:
    out = {} if out is None else out
    if isinstance(obj, dict):
        for k, v in obj.items():
            _scalars(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, list):
        if len(obj) <= 10 and all(isinstance(x, (int, float, str, bool)) or x is None for x in obj):
            out[prefix] = obj
    elif isinstance(obj, (int, float, str, bool)) or obj is None:
        if not (isinstance(obj, str) and len(obj) > 300):
            out[prefix] = _finite(obj) if isinstance(obj, float) else obj
    return out


def probes_section(info: RunInfo, items: list[dict]) -> dict:
    by = {i["id"]: i for i in items}
    sec = {"near_copies": {k: by["near_copies"][k] for k in ("status", "reason")},
           "membership": {k: by["membership"][k] for k in ("status", "reason")},
           "rows": probe_rows(info, items)}
    if info.probes is None:
        sec["status"] = info.probes_note
        return sec
    if info.probes.get("contains_private_images") is not False:
        sec["status"] = ("probes_summary.json does not declare \"contains_private_images\": false; "
                         "its fields are not copied into the card")
        return sec
    fields = {k: v for k, v in _scalars(info.probes).items() if not k.startswith("checks.")}
    sec["status"] = "run"
    sec["summary"] = dict(list(fields.items())[:MAX_PROBE_FIELDS])
    if len(fields) > MAX_PROBE_FIELDS:
        sec["summary_truncated"] = f"{len(fields) - MAX_PROBE_FIELDS} more fields in the review report"
    return sec


def utility_section(info: RunInfo) -> dict:
    ev = info.evaluation
    if ev is None:
        return {"status": info.evaluation_note}
    rows = utility_rows(ev)
    u = ev.get("utility") or {}
    out_rows = {}
    for rid, row in rows.items():
        mean, sd = row_auc(row)
        priv = row.get("privacy") if isinstance(row.get("privacy"), dict) else {}
        acc = row.get("balanced_accuracy") if isinstance(row.get("balanced_accuracy"), dict) else {}
        out_rows[rid] = {"label": row.get("label", rid), "roc_auc": mean, "roc_auc_std": sd,
                         "balanced_accuracy": as_float(acc.get("mean")), "epsilon": _finite(priv.get("epsilon")),
                         "seeds_predicting_one_class": row.get("seeds_predicting_one_class")}
    fid = ev.get("fidelity") if isinstance(ev.get("fidelity"), dict) else None
    fid_out = None
    if fid:
        overall = fid.get("overall") or {}
        fid_out = {"feature_extractor": (fid.get("feature_extractor") or {}).get("name"),
                   "real_set": fid.get("real_set"), "reference": fid.get("reference_set"),
                   "n_matched": overall.get("n_matched"),
                   "metrics": {m: {"cohort": _finite(v.get("cohort")), "real_vs_real": _finite(v.get("real_vs_real")),
                                   "better": v.get("better")}
                               for m, v in (overall.get("metrics") or {}).items() if isinstance(v, dict)}}
    return {"status": "run", "test_set": u.get("test_set"), "seeds": u.get("seeds"), "rows": out_rows,
            "fidelity": fid_out, "note": ev.get("privacy_note")}


def intended_uses(info: RunInfo) -> list[str]:
    return [
        "Developing, debugging and teaching image-analysis pipelines where the real images cannot be shared.",
        "Pretraining or augmenting classifiers that are then validated on real data the user is entitled to use.",
        "Method research on privacy-preserving data sharing (the card's numbers are the baselines to beat).",
    ]


def known_limits(info: RunInfo, items: list[dict], cohort: dict) -> list[str]:
    by = {i["id"]: i for i in items}
    lim = [
        "Not for clinical decisions or for validating a clinical model: synthetic images are not patients, and "
        "results on them must be confirmed on real data.",
        "The DP guarantee covers the private training data's units as stated; it says nothing about the public "
        "pretraining data, which the model may reproduce.",
    ]
    p = info.privacy or {}
    if p.get("unit") == "per image":
        lim.append("The unit of privacy is one image: a patient with several images in the private data is protected "
                   "by a weaker guarantee (group privacy).")
    if by["utility"]["status"] == "fail":
        lim.append("A classifier trained on this cohort did not beat DP-SGD trained directly on the real data at the "
                   "same epsilon: the cohort adds no downstream value over that baseline.")
    elif by["utility"]["status"] == "warn":
        lim.append(f"Downstream utility: {by['utility']['reason']}.")
    if by["near_copies"]["status"] != "pass" or by["membership"]["status"] != "pass":
        lim.append("Empirical privacy probes: near-copies " + by["near_copies"]["status"] + ", membership "
                   + by["membership"]["status"] + " (see the probe results).")
    if cohort.get("n", 0) < 1000:
        lim.append(f"Small cohort ({cohort.get('n')} images): fidelity and utility estimates are noisy.")
    lim.append("Label space and image size are public schema; the class balance comes from "
               + str(((info.latest('artifact', name='cohort') or {}).get('class_counts_source')) or 'the sampling config')
               + ".")
    return lim


def build_card(info: RunInfo, items: list[dict], cohort: dict, files: dict, gone: list[dict], allowed: dict,
               include_weights: bool = False) -> dict:
    from dpgen.report.checklist import overall

    return {
        "card_version": CARD_VERSION,
        "title": f"Synthetic cohort: {info.name}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": {**cohort, "class_names": list(_get(info.config, "data.class_names") or []), "files": files,
                    "license_note": "set by the data custodian"},
        "how_it_was_made": how_it_was_made(info),
        "privacy": privacy_section(info),
        "probes": probes_section(info, items),
        "utility": utility_section(info),
        "checklist": {"overall": overall(items), "items": [{k: i[k] for k in ("id", "title", "status", "reason")} for i in items]},
        "intended_uses": intended_uses(info),
        "known_limits": known_limits(info, items, cohort),
        "included_from_run": {rel: e.get("release_reason") for rel, e in allowed.items()
                              if rel == "cohort/cohort.npz" or (include_weights and rel.startswith("checkpoints/finetune"))},
        "left_out": gone,
        "checksums": f"{CHECKSUMS} (sha256sum -c {CHECKSUMS})",
    }


# ----------------------------------------------------------------------------- Markdown


def _md_escape(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def card_markdown(card: dict) -> str:
    d, p, h = card["dataset"], card["privacy"], card["how_it_was_made"]
    L = [f"# {card['title']}", ""]
    L.append(f"{d['n']} synthetic {d['dims']} images ({'x'.join(map(str, d['image_shape']))}), classes "
             + ", ".join(f"{k}: {v}" for k, v in d["class_counts"].items())
             + f". Differentially private: ε = {fmt_num(p['epsilon'], 4)}, δ = {fmt_num(p['delta'])}, {p['unit']}.")
    L += ["", "## Contents", "", "| file | what |", "|---|---|",
          f"| `images/` | {d['n']} {d['image_format']} images |",
          "| `labels.csv` | `image`, `label`, `class_name` per image (a dpgen folder source) |",
          "| `cohort.npz` | the same cohort in MedMNIST layout (`train_images`, `train_labels`) |",
          "| `dataset_card.md`, `dataset_card.json` | this card |"]
    if "weights" in d["files"]:
        L.append("| `weights/finetune.safetensors` | the DP fine-tuned generator (post-processing of DP-SGD) |")
    L += [f"| `{CHECKSUMS}` | SHA-256 of every file; check with `sha256sum -c {CHECKSUMS}` |", ""]

    L += ["## How it was made", ""]
    pt, ft, sp = h["public_pretraining"], h["dp_finetuning"], h["sampling"]
    L.append(f"- Generator: {h['generator']}.")
    L.append(f"- Pretrained on public data ({pt['data']}), {pt['steps']} steps, batch {pt['batch_size']}: no privacy cost.")
    L.append(f"- Fine-tuned with DP-SGD on {ft['data']}: {ft['steps']} steps, expected batch {ft['expected_batch_size']} "
             f"(sample rate {fmt_num(ft['sample_rate'])}), clipping norm {fmt_num(ft['max_grad_norm'])}, noise multiplier "
             f"σ = {fmt_num(ft['noise_multiplier_sigma'], 4)}, {ft['noise_multiplicity']} noise draw(s) per unit, "
             f"accountant {ft['accountant']}.")
    L.append(f"- Sampled with {sp['sampler']} ({sp['steps']} steps, guidance {fmt_num(sp['guidance_scale'])}, seed {sp['seed']}); "
             f"class counts: {sp['class_counts_source'] or sp['class_counts']}.")
    sw = h["software"]
    L.append(f"- Software: dpgen {sw.get('dpgen')}, torch {sw.get('torch')}, opacus {sw.get('opacus')}, monai {sw.get('monai')}"
             + (f", commit {sw['git_commit'][:12]}" if sw.get("git_commit") else "") + ".")

    L += ["", "## Privacy guarantee", ""]
    L.append(f"- **ε = {fmt_num(p['epsilon'], 4)}** (PLD accountant; RDP cross-check {fmt_num(p['epsilon_rdp'], 4)}) at "
             f"**δ = {fmt_num(p['delta'])}**; target ε {fmt_num(p['target_epsilon'], 4)}.")
    L.append(f"- Unit of privacy: **{p['unit']}** — {p['unit_meaning']}.")
    L.append(f"- What it means: {p['meaning']}.")
    for r in p["dp_releases"]:
        vals = r.get("values")
        shown = [round(float(v), 1) for v in vals] if isinstance(vals, list) and all(as_float(v) is not None for v in vals) else vals
        L.append(f"- Also released under this budget: {r['name']} (DP, Gaussian mechanism), values {shown}.")
    b = p.get("reconstruction_bound")
    if b:
        L.append(f"- Reconstruction bound: P[reconstruction] ≤ **{fmt_num(b['bound'])}** at prior κ = {fmt_num(b['kappa'])} "
                 f"(tight; Gaussian-DP approximation {fmt_num(b.get('gdp_bound'))}): {b['meaning']}.")
    L.append(f"- Membership inference: no attack can exceed ROC-AUC {fmt_num(p['membership_auc_limit'], 4)} at this (ε, δ).")

    pr = card["probes"]
    L += ["", "## Probe results (aggregate)", ""]
    L += ["| probe | status | result | theoretical limit / reference |", "|---|---|---|---|"]
    L += [f"| {_md_escape(r['probe'])} | **{r['status']}** | {_md_escape(r['result'])} | {_md_escape(r['limit'])} |"
          for r in pr.get("rows") or []]
    if pr.get("summary"):
        L += ["", f"The probes summary's {len(pr['summary'])} aggregate fields are in `dataset_card.json` (`probes.summary`)."]
    elif pr.get("status") != "run":
        L += ["", f"Probes: {pr.get('status')}"]

    u = card["utility"]
    L += ["", "## Utility next to its baselines", ""]
    if u.get("rows"):
        L.append(f"Classifiers tested on {u.get('test_set')}, {u.get('seeds')} seed(s); ROC-AUC mean ± std.")
        L += ["", "| classifier trained on | ε | ROC-AUC | balanced accuracy |", "|---|---|---|---|"]
        for rid, r in u["rows"].items():
            sd = f" ± {fmt_num(r['roc_auc_std'], 2)}" if r.get("roc_auc_std") else ""
            L.append(f"| {_md_escape(r['label'])} | {fmt_num(r['epsilon'], 4)} | {fmt_num(r['roc_auc'])}{sd} | "
                     f"{fmt_num(r['balanced_accuracy'])} |")
        if u.get("fidelity"):
            f = u["fidelity"]
            L += ["", f"Fidelity ({f['feature_extractor']} features; cohort vs {f['real_set']}, next to the real-vs-real "
                  f"reference {f['reference']}, n = {f['n_matched']}):", "",
                  "| metric | cohort | real vs real | better |", "|---|---|---|---|"]
            L += [f"| {_md_escape(m)} | {fmt_num(v['cohort'])} | {fmt_num(v['real_vs_real'])} | {v['better']} |"
                  for m, v in f["metrics"].items()]
        if u.get("note"):
            L += ["", f"_{u['note']}_"]
    else:
        L.append(f"- Not evaluated: {u.get('status')}")

    c = card["checklist"]
    L += ["", f"## Release checklist: {c['overall'].upper()}", "", "| check | status | why |", "|---|---|---|"]
    L += [f"| {i['title']} | **{i['status']}** | {_md_escape(i['reason'])} |" for i in c["items"]]
    L += ["", "## Intended uses", ""] + [f"- {x}" for x in card["intended_uses"]]
    L += ["", "## Known limits", ""] + [f"- {x}" for x in card["known_limits"]]
    L += ["", "## Left out of this bundle", "",
          "Everything in the run directory that is not in this bundle, and why:", "",
          "| path | reason |", "|---|---|"]
    L += [f"| `{_md_escape(i['path'])}` | {_md_escape(i['reason'])} |" for i in summarize_left_out(card["left_out"])]
    L += ["", f"The full list is in `dataset_card.json` (`left_out`). Check the files: `sha256sum -c {CHECKSUMS}`.", ""]
    return "\n".join(L)


__all__ = ["build_card", "card_markdown", "how_it_was_made", "privacy_section", "probes_section", "utility_section"]
