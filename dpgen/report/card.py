"""The dataset card of a release bundle (JSON for machines, Markdown for people).

The card leaves the institution with the cohort, so it holds only what may: DP outputs,
post-processing of them, public data and user choices (dpgen.report.disclosure decides the
privacy statement). Every figure it shows names its privacy source. It answers what the
guarantee is, exactly (which outputs, which neighbouring relation, which unit, what is not
covered), how the cohort was made (the user's choices), intended uses and limits, the
shareable checklist, and what was left out of the bundle. The data holder's evaluation and
probes (computed on private data without DP) are not in it: they are the internal review.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dpgen.report.disclosure import shared_privacy
from dpgen.report.release import CHECKSUMS, summarize_left_out
from dpgen.report.runinfo import RunInfo, fmt_num

CARD_VERSION = 2

# The privacy source of each kind of figure the card shows (every figure names one).
SOURCE_USER = "user choice (config)"
SOURCE_PUBLIC = "public data"
SOURCE_DP = "DP output (in the ledger)"
SOURCE_POST = "post-processing of DP outputs"
SOURCE_SOFTWARE = "software (no data)"


def _get(obj: Any, dotted: str, default: Any = None) -> Any:
    """config.a.b.c, or `default` when a section or field does not exist."""
    for part in dotted.split("."):
        obj = getattr(obj, part, None) if not isinstance(obj, dict) else obj.get(part)
        if obj is None:
            return default
    return obj


def _public_name(source: str | None) -> str | None:
    """A public data source as a name (a MedMNIST name or a file name), never a path."""
    return None if not source else Path(str(source)).name


def public_data_caveat(info: RunInfo) -> str | None:
    """When the "public" data is another split of the private data set (e.g. AdrenalMNIST3D's
    val split standing in for a public set), it is not public in the sense of the guarantee."""
    c = info.config
    pub, priv = _get(c, "data.public.source"), _get(c, "data.private.source")
    if not pub or not priv:
        return None
    try:
        from dpgen.data import resolve_source

        same = resolve_source(pub).resolve() == resolve_source(priv).resolve()
    except Exception:  # noqa: BLE001 - not resolvable here: compare the names
        same = Path(str(pub)).name == Path(str(priv)).name
    if not same:
        return None
    return (f"the pretraining data is another split ({_get(c, 'data.public.split')}) of the same data set as the "
            f"private data ({_get(c, 'data.private.split')} split): it stands in for a public data set but is not one. "
            f"A patient may appear in both splits (e.g. the two glands of one patient), and nothing about that split "
            f"is covered by the guarantee.")


def how_it_was_made(info: RunInfo) -> dict:
    c, shared = info.config, shared_privacy(info)
    cohort = info.latest("artifact", name="cohort") or {}
    versions = (info.manifest or {}).get("versions") or {}
    generator = str(_get(c, "model.generator", "generator"))
    if info.federated:
        return _federated_how(info, shared, cohort, versions, generator)
    out = {
        "generator": {"family": generator, "channels": _get(c, "model.channels"),
                      "prediction_type": _get(c, "model.prediction_type"), "source": SOURCE_USER},
        "public_pretraining": {"data": _public_name(_get(c, "data.public.source")),
                               "split": _get(c, "data.public.split"), "steps": _get(c, "pretrain.steps"),
                               "batch_size": _get(c, "pretrain.batch_size"), "source": SOURCE_PUBLIC,
                               "caveat": public_data_caveat(info)},
        "dp_finetuning": {
            "data": "the data holder's private training data (not named here)",
            "algorithm": "DP-SGD: Poisson sampling of privacy units, per-unit clipping, Gaussian noise (Opacus)",
            "mechanisms": [m.__dict__ for m in shared.mechanisms],
            "lr": _get(c, "finetune.lr"), "trainable": _get(c, "finetune.trainable"),
            "accountant": f"{_get(c, 'privacy.accountant')} (dp-accounting)",
            "source": SOURCE_USER + "; noise multiplier and sample rate only when N is public (replace-one)",
        },
        "sampling": _sampling_how(c, cohort),
        "software": _software(info, versions, ("dpgen", "torch", "opacus", "monai", "dp-accounting")),
        "run_name": info.name,
    }
    return out


def _sampling_how(c, cohort: dict) -> dict:
    return {"sampler": _get(c, "sample.sampler"), "steps": _get(c, "sample.steps"),
            "guidance_scale": _get(c, "sample.guidance_scale"), "seed": _get(c, "sample.seed"),
            "class_counts": cohort.get("class_counts_source") or _get(c, "sample.class_counts.mode"),
            "source": SOURCE_USER}


def _software(info: RunInfo, versions: dict, packages: tuple[str, ...]) -> dict:
    return {**{p: versions.get(p) for p in packages}, "git_commit": (info.manifest or {}).get("git_commit"),
            "source": SOURCE_SOFTWARE}


def _federated_how(info: RunInfo, shared, cohort: dict, versions: dict, generator: str) -> dict:
    """A federated coordinator's cohort: the sites' DP-SGD, aggregated; the user's choices only."""
    c = info.config
    fed = shared.federation or {}
    return {
        "generator": {"family": generator, "channels": _get(c, "model.channels"),
                      "prediction_type": _get(c, "model.prediction_type"), "source": SOURCE_USER},
        "public_pretraining": {"data": _public_name(_get(c, "data.public.source")),
                               "split": _get(c, "data.public.split"), "steps": _get(c, "pretrain.steps"),
                               "batch_size": _get(c, "pretrain.batch_size"), "source": SOURCE_PUBLIC,
                               "caveat": None},
        "federated_finetuning": {
            "data": "each site's own private training data (not named here; it never left the site)",
            "algorithm": "at every site, dpgen's DP-SGD on its own data (Poisson sampling of privacy units from the "
                         "site's secret seed, per-unit clipping, Gaussian noise, Opacus; its own accountant and "
                         "budget); the coordinator aggregated the sites' updates (Flower)",
            "rounds": fed.get("rounds"), "sites": fed.get("contributing_sites"), "weighting": fed.get("weighting"),
            "secure_aggregation": fed.get("secure_aggregation"), "trainable": _get(c, "coordinator.trainable"),
            "per_site_settings": {r["site"]: r["user_choices"] for r in (shared.sites or [])},
            "source": SOURCE_USER + "; per-site settings as the sites reported them (no N, sample rate or noise "
                                    "multiplier)",
        },
        "sampling": _sampling_how(c, cohort),
        "software": _software(info, versions, ("dpgen", "torch", "opacus", "monai", "dp-accounting", "flwr")),
        "run_name": info.name,
    }


def intended_uses() -> list[str]:
    return [
        "Developing, debugging and teaching image-analysis pipelines where the real images cannot be shared.",
        "Pretraining or augmenting classifiers that are then validated on real data the user is entitled to use.",
        "Method research on privacy-preserving data sharing.",
    ]


def known_limits(info: RunInfo, cohort: dict) -> list[str]:
    shared = shared_privacy(info)
    lim = [
        "Not for clinical decisions or for validating a clinical model: synthetic images are not patients, and "
        "results on them must be confirmed on real data.",
        "The guarantee covers the private training data's units as stated; it says nothing about the public "
        "pretraining data, which the generator may reproduce.",
        "How useful and how faithful this cohort is was measured by the data holder on private data (internal "
        "review); those figures are not DP, so they are not in this bundle. Validate on your own real data.",
    ]
    if shared.sites is not None:
        lim.append("Federated: the guarantee is per site, for that site's data only, as each site reported it; the "
                   "coordinator could not verify the figures, and nothing bounds a patient whose images are at "
                   "several sites.")
    if shared.unit == "per image" or any(r["unit"] == "per image" for r in shared.sites or []):
        lim.append("The unit of privacy is one image: a patient with several images in the private data is protected "
                   "by a weaker guarantee (group privacy).")
    caveat = public_data_caveat(info)
    if caveat:
        lim.append("Pretraining data: " + caveat)
    if cohort.get("n", 0) < 1000:
        lim.append(f"Small cohort ({cohort.get('n')} images).")
    lim.append("Label space and image size are public schema (user choices); the class balance comes from "
               + str(((info.latest("artifact", name="cohort") or {}).get("class_counts_source")) or "the sampling config")
               + ".")
    return lim


def build_card(info: RunInfo, items: list[dict], cohort: dict, files: dict, gone: list[dict], allowed: dict,
               include_weights: bool = False) -> dict:
    from dpgen.report.checklist import overall

    shared = shared_privacy(info)
    return {
        "card_version": CARD_VERSION,
        "title": f"Synthetic cohort: {info.name}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": {**cohort, "class_names": list(_get(info.config, "data.class_names") or []), "files": files,
                    "source": f"{SOURCE_POST} (the generator and the class counts)", "license_note": "set by the data custodian"},
        "how_it_was_made": how_it_was_made(info),
        "privacy": {**shared.to_dict(), "source": "the run's privacy ledger: the DP mechanisms' accounting "
                                                  "(what N would reveal is withheld under add/remove)"},
        "checklist": {"overall": overall(items), "items": [{k: i[k] for k in ("id", "title", "status", "reason")}
                                                            for i in items],
                      "note": "only the checks whose answers depend on nothing private; the data holder's internal "
                              "review (near-copies, membership inference, utility) is computed on private data "
                              "without DP and is not part of this bundle"},
        "intended_uses": intended_uses(),
        "known_limits": known_limits(info, cohort),
        "included_from_run": {rel: e.get("release_reason") for rel, e in allowed.items()
                              if rel == "cohort/cohort.npz" or (include_weights and rel.startswith("checkpoints/finetune"))},
        "left_out": summarize_left_out(gone),
        "checksums": f"{CHECKSUMS} (sha256sum -c {CHECKSUMS})",
    }


# ----------------------------------------------------------------------------- Markdown


def _md_escape(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def federated_privacy_markdown(p: dict) -> list[str]:
    """A federation's guarantee: one line per site, no single ε."""
    f = p["federation"]
    L = [f"- **{p['meaning'][0].upper() + p['meaning'][1:]}.**", "",
         "| site | ε | δ | unit | neighbouring relation | rounds | steps | state |", "|---|---|---|---|---|---|---|---|"]
    for r in p["sites"]:
        eps = f"{'=' if r['epsilon_kind'].startswith('exact') else '≤'} {fmt_num(r['epsilon'], 4)}"
        state = ("complete" if r["complete"] else "stopped before its plan was used up") + (
            "" if r["confirmed_at_finish"] else "; did not confirm at the end (its last report)")
        L.append(f"| {_md_escape(r['site'])} | {eps} | {fmt_num(r['delta'])} | {r['unit']} | "
                 f"{r['neighbouring'].replace('_', '/')} | {', '.join(map(str, r['rounds_contributed']))} | "
                 f"{r['steps_done']}/{r['planned_steps']} | {state} |")
    L.append("")
    for r in p["sites"]:
        lim = r.get("limits") or {}
        tpr = ", ".join(f"TPR ≤ {fmt_num(v, 3)} at {k}" for k, v in (lim.get("membership_tpr") or {}).items())
        L.append(f"- Site `{r['site']}`: {r['meaning']}. ε is {r['epsilon_kind']}."
                 + (f" Against membership inference on this site's data, (ε, δ) alone promises ROC-AUC ≤ "
                    f"{fmt_num(lim['membership_auc'], 4)}, {tpr}." if lim else ""))
    L.append(f"- Reported, not verified: {f['reported_not_verified']}.")
    L.append(f"- No bound across sites: {f['no_bound_across_sites']}.")
    for sa in f["secure_aggregation"]:
        if sa.get("enabled"):
            L.append(f"- Secure aggregation: {sa.get('protocol')}, num_shares {fmt_num(sa.get('num_shares'))}, "
                     f"reconstruction threshold {fmt_num(sa.get('reconstruction_threshold'))}, clipping range "
                     f"{fmt_num(sa.get('clipping_range'))}, quantization range {fmt_num(sa.get('quantization_range'))}: "
                     f"the coordinator received only masked updates and unmasked their weighted sum.")
        else:
            L.append("- Secure aggregation: OFF: the coordinator received each site's (DP) update in the clear.")
    L.append(f"- Rounds aggregated: {', '.join(map(str, f['rounds']))}; {f['weighting']}.")
    for d in f["did_not_take_part"]:
        L.append(f"- Did not take part: site `{d['site']}`: {d['reason']}.")
    for d in f["dropped_out"]:
        L.append(f"- Dropped out: site `{d['site']}` did not contribute to round(s) {', '.join(map(str, d['rounds']))}.")
    for d in f["failed_rounds"]:
        L.append(f"- Round {d['round']} attempt {d['attempt']} was not aggregated: {d['reason']}.")
    L.append("- Covered: " + "; ".join(p["covers"]) + ".")
    L.append("- Not covered: " + "; ".join(p["does_not_cover"]) + ".")
    if p.get("not_stated"):
        L.append(f"- Not stated here: {p['not_stated']}.")
    return L


def privacy_markdown(p: dict) -> list[str]:
    """The guarantee in Markdown (the card and the shareable report say the same)."""
    if p.get("sites") is not None:
        return federated_privacy_markdown(p)
    L = [f"- **{p['meaning']}.**", f"- ε is the {p['epsilon_kind']}; δ = {fmt_num(p['delta'])}; neighbouring relation: "
         f"**{p['neighbouring'].replace('_', '/')}**; unit of privacy: **{p['unit']}**."]
    if p.get("n_units"):
        L.append(f"- The private training data has N = {p['n_units']} units (public by the data holder's choice: "
                 f"replace-one). The same events give ε = {fmt_num(p.get('epsilon_add_remove'), 4)} for add/remove "
                 f"neighbours.")
    L.append("- Covered: " + "; ".join(p["covers"]) + ".")
    L.append("- Not covered: " + "; ".join(p["does_not_cover"]) + ".")
    if p.get("not_stated"):
        L.append(f"- Not stated here: {p['not_stated']}")
    for m in p["mechanisms"]:
        bits = []
        if m.get("steps"):
            bits.append(f"{m['steps']} steps, expected batch {fmt_num(m['expected_batch_size'])}, clipping norm "
                        f"{fmt_num(m['max_grad_norm'])}, {m['noise_multiplicity']} noise draw(s) per unit")
        if m.get("sigma") is not None:
            bits.append(f"noise multiplier σ = {fmt_num(m['sigma'], 4)}, sample rate q = {fmt_num(m['sample_rate'], 4)}")
        if m.get("values") is not None:
            vals = m["values"]
            shown = [round(float(v), 1) for v in vals] if isinstance(vals, list) and vals and \
                not isinstance(vals[0], list) else vals
            bits.append(f"released values {shown} (noise std {fmt_num(m.get('noise_std'))})")
        L.append(f"- Mechanism `{m['name']}`: {m['what']}" + (f" ({'; '.join(bits)})" if bits else "") + ".")
    lim = p.get("limits") or {}
    if lim:
        tpr = ", ".join(f"TPR ≤ {fmt_num(v, 3)} at {k}" for k, v in lim["membership_tpr"].items())
        L.append(f"- What (ε, δ) alone promises against membership inference: ROC-AUC ≤ "
                 f"{fmt_num(lim['membership_auc'], 4)}, {tpr} ({lim['source']}).")
    ml = p.get("mechanism_limits")
    if ml:
        L.append(f"- Reconstruction: {ml['reconstruction']['meaning']} (composition of "
                 f"{', '.join(ml['mechanisms'])}).")
    return L


def card_markdown(card: dict) -> str:
    d, p, h = card["dataset"], card["privacy"], card["how_it_was_made"]
    L = [f"# {card['title']}", ""]
    L.append(f"{d['n']} synthetic {d['dims']} images ({'x'.join(map(str, d['image_shape']))}), classes "
             + ", ".join(f"{k}: {v}" for k, v in d["class_counts"].items()) + ".")
    L += ["", "## Contents", "", "| file | what |", "|---|---|",
          f"| `images/` | {d['n']} {d['image_format']} images |",
          "| `labels.csv` | `image`, `label`, `class_name` per image (a dpgen folder source) |",
          "| `cohort.npz` | the same cohort in MedMNIST layout (`train_images`, `train_labels`) |",
          "| `dataset_card.md`, `dataset_card.json` | this card |"]
    if "weights" in d["files"]:
        L.append("| `weights/finetune.safetensors` | the DP fine-tuned generator |")
    L += [f"| `{CHECKSUMS}` | SHA-256 of every file; check with `sha256sum -c {CHECKSUMS}` |", ""]

    L += ["## Privacy guarantee", ""] + privacy_markdown(p)
    L += ["", "## How it was made", ""]
    g, pt, sp = h["generator"], h["public_pretraining"], h["sampling"]
    L.append(f"- Generator: {g['family']} (channels {g['channels']}, prediction {g['prediction_type']}) [{g['source']}].")
    L.append(f"- Pretrained on public data ({pt['data']}, {pt['split']} split), {pt['steps']} steps, batch "
             f"{pt['batch_size']}: no privacy cost [{pt['source']}]." + (f" Caveat: {pt['caveat']}" if pt.get("caveat") else ""))
    if "federated_finetuning" in h:
        ft = h["federated_finetuning"]
        L.append(f"- Fine-tuned on {ft['data']}: {ft['algorithm']}; {len(ft['rounds'] or [])} round(s), sites "
                 f"{', '.join(ft['sites'] or [])}, trainable {ft['trainable']} [{ft['source']}].")
        for site, u in ft["per_site_settings"].items():
            L.append(f"  - `{site}`: {u['rounds']} round(s) x {u['local_steps']} DP-SGD steps, expected batch "
                     f"{u['expected_batch_size']}, clipping norm {fmt_num(u['max_grad_norm'])}, "
                     f"{u['noise_multiplicity']} noise draw(s) per unit, accountant {u['accountant']}.")
    else:
        ft = h["dp_finetuning"]
        L.append(f"- Fine-tuned on {ft['data']} with {ft['algorithm']}; learning rate {fmt_num(ft['lr'])}, trainable "
                 f"{ft['trainable']}, accountant {ft['accountant']} [{ft['source']}].")
    L.append(f"- Sampled with {sp['sampler']} ({sp['steps']} steps, guidance {fmt_num(sp['guidance_scale'])}, seed "
             f"{sp['seed']}); class counts: {sp['class_counts']} [{sp['source']}].")
    sw = h["software"]
    L.append(f"- Software: dpgen {sw.get('dpgen')}, torch {sw.get('torch')}, opacus {sw.get('opacus')}, monai "
             f"{sw.get('monai')}, dp-accounting {sw.get('dp-accounting')}"
             + (f", flwr {sw['flwr']}" if sw.get("flwr") else "")
             + (f", commit {sw['git_commit'][:12]}" if sw.get("git_commit") else "") + ".")

    c = card["checklist"]
    L += ["", f"## Release checklist: {c['overall'].upper()}", "", "| check | status | why |", "|---|---|---|"]
    L += [f"| {i['title']} | **{i['status']}** | {_md_escape(i['reason'])} |" for i in c["items"]]
    L += ["", f"_{c['note']}_"]
    L += ["", "## Intended uses", ""] + [f"- {x}" for x in card["intended_uses"]]
    L += ["", "## Known limits", ""] + [f"- {x}" for x in card["known_limits"]]
    L += ["", "## Left out of this bundle", "",
          "Everything in the run directory that is not in this bundle, and why:", "",
          "| path | reason |", "|---|---|"]
    L += [f"| `{_md_escape(i['path'])}` | {_md_escape(i['reason'])} |" for i in card["left_out"]]
    L += ["", "Folders are listed without the names of the files inside them (`dpgen release` printed the full list "
          f"for the data holder). Check the files: `sha256sum -c {CHECKSUMS}`.", ""]
    return "\n".join(L)


__all__ = ["build_card", "card_markdown", "how_it_was_made", "privacy_markdown", "public_data_caveat"]
