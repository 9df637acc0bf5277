"""The audit stage: memorization, membership inference and reconstruction probes on a finished run.

    from dpgen.probes import audit_stage, format_summary
    results = audit_stage(config, RunDir("runs/quick"))
    print(format_summary(results))

Data it reads (never the private test split, which stays for the final evaluation):
- the cohort (RUN/cohort/cohort.npz);
- the private training images the run fine-tuned on (data.private, with its max_images);
- the private validation split: the held-out reference for memorization and the non-members
  of membership inference;
- the pretrained (public-only) and fine-tuned checkpoints, and the privacy ledger.

What membership inference and reconstruction attack depends on the generator family: the
network DP-SGD trained (a diffusion UNet in pixel or latent space, a cGAN discriminator); the
family's probe adapter (dpgen.probes.adapters, named in dpgen.models.registry) supplies the
scores, the non-DP overfit control and the inversion target. Memorization reads the cohort.

Outputs, all under RUN/internal/audit/ (never released):
- probes.json: every result, with per-image tables (nearest-neighbour indices and distances,
  attack scores, per-target inversion metrics);
- *.png: closest pairs, distance histograms, ROC curves, reconstructions (private images);
- probes_summary.json: the aggregates the internal release review reads (counts, fractions,
  quantiles, AUCs, TPRs, intervals, bounds; no image, no per-record value). They are still
  statistics of private data computed without DP, so they stay internal too.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from dpgen.core.device import resolve_device
from dpgen.core.schemas import ProbesSummary
from dpgen.data import DataError, load_dataset, load_npz
from dpgen.privacy import mechanisms
from dpgen.privacy.bounds import rero_bound_events
from dpgen.privacy.ledger import PrivacyLedger
from dpgen.probes import membership as mia
from dpgen.probes import memorization as mem
from dpgen.probes import reconstruction as rec
from dpgen.probes.adapters import ProbeAdapter
from dpgen.probes.figures import nn_histograms, pairs_grid, reconstruction_grid, roc_figure
from dpgen.probes.stats import dp_tpr_limits, roc_curve
from dpgen.rundir import RunDir, to_jsonable, write_json_atomic

MECHANISM = mechanisms.FINETUNE

PRIVACY_NOTE = (
    "INTERNAL: aggregate statistics of privacy probes computed on the private data without differential privacy "
    "(counts, fractions, quantiles, attack AUCs and TPRs, bounds). For the data holder's internal release review "
    "only; never part of a bundle or of the shareable report. Per-image results and figures are beside this file."
)


@dataclass
class AuditOptions:
    memorization: bool = True
    membership: bool = True
    reconstruction: bool = True
    overfit_control: bool = True
    attack_targets: int = 4  # gradient-inversion targets per model (classifier; the generator's gets min(2, this))
    # Targets (and Adam iterations) of the inversion of the generator's DP-trained network: the
    # diffusion UNet's loss, the latent UNet's loss through the encoder, or the cGAN
    # discriminator's loss (dpgen.probes.adapters). The names are from when only diffusion had one.
    diffusion_inversion_targets: int = 2
    feature_extractor: object = "public-encoder"  # "public-encoder" | None | FeatureExtractor | nn.Module
    encoder_epochs: int | None = None
    closest_pairs: int = 16
    seed: int = 0
    loss_attack: mia.LossAttackOptions = field(default_factory=mia.LossAttackOptions)
    overfit: mia.OverfitOptions = field(default_factory=mia.OverfitOptions)
    inversion: rec.InversionOptions = field(default_factory=rec.InversionOptions)
    diffusion_inversion_iterations: int | None = None  # default: inversion.iterations (see diffusion_inversion_targets)

    def to_dict(self) -> dict:
        d = asdict(self)
        fx = self.feature_extractor
        d["feature_extractor"] = fx if isinstance(fx, (str, type(None))) else getattr(fx, "name", type(fx).__name__)
        return d


# ----------------------------------------------------------------------------- context


def privacy_context(config, rd: RunDir) -> dict:
    """epsilon/delta and the DP-SGD parameters of the run, from its ledger."""
    ledger = PrivacyLedger(rd.ledger_path)
    delta = config.privacy.delta
    ctx = {"delta": delta, "epsilon": None, "sigma": None, "sample_rate": None, "steps": None,
           "max_grad_norm": config.finetune.max_grad_norm, "unit": None, "n_units": None, "ledger_bound": None,
           "fine_tuned": rd.finetune_weights.is_file()}
    if not ledger.exists():
        ctx["note"] = "no privacy ledger: the run has no DP fine-tuning record"
        return ctx
    summary = ledger.summary(delta)
    ctx["epsilon"] = summary.epsilon
    ctx["unit"] = summary.unit
    ctx["events"] = summary.events  # every released mechanism: limits and bounds are for their composition
    ctx["neighbouring"] = summary.neighbouring
    ctx["mechanisms"] = summary.release_mechanisms
    plan = ledger.latest("dp_plan", mechanism=MECHANISM) or {}
    done = ledger.latest("dp_complete", mechanism=MECHANISM) or ledger.latest("dp_progress", mechanism=MECHANISM)
    ev = (done or {}).get("event") or {}
    ctx.update(sigma=plan.get("sigma", ev.get("sigma")), sample_rate=plan.get("sample_rate", ev.get("sample_rate")),
               steps=ev.get("steps", (done or {}).get("steps_done")), n_units=plan.get("n_units"))
    if plan.get("max_grad_norm") is not None:
        ctx["max_grad_norm"] = plan["max_grad_norm"]
    b = ledger.latest("bound")
    if b is not None:
        ctx["ledger_bound"] = {**{k: b["bound"].get(k) for k in ("bound", "method", "kappa", "tolerance")},
                               "mechanisms": b.get("mechanisms")}
    return ctx


def _run_bound_at(ctx: dict, kappa: float) -> dict | None:
    """The ReRo bound of every released mechanism composed, at a given prior."""
    if not ctx.get("sigma") or not ctx.get("events"):
        return None
    b = rero_bound_events(ctx["events"], kappa, neighbouring=ctx.get("neighbouring", "add_remove"))
    return {"bound": b["bound"], "kappa": kappa, "method": "tight", "tolerance": b["tolerance"],
            "mechanisms": ctx.get("mechanisms")}


# ----------------------------------------------------------------------------- probes


def _memorization(config, rd, cohort, train, val, opts: AuditOptions, device, progress, out_dir: Path):
    extractor = None
    if opts.feature_extractor is not None:
        from dpgen.evaluation.features import build_extractor

        kw = {} if opts.encoder_epochs is None else {"encoder_epochs": opts.encoder_epochs}
        extractor = build_extractor(opts.feature_extractor, config, rd, train.image_shape, device=device,
                                    progress=progress, **kw)
    result, per = mem.memorization_probe(cohort.images, train.images, None if val is None else val.images,
                                         extractor=extractor, device=device, progress=progress)
    if extractor is not None:
        result["feature_extractor"] = {"name": extractor.name, "description": extractor.description}
    figures = []
    # closest pairs (pixel space, smallest Carlini ratio first): synthetic and held-out
    for name, images in (("synthetic", cohort.images), ("held_out", None if val is None else val.images)):
        nb = per["pixel"].get(name)
        if nb is None:
            continue
        order = torch.argsort(nb.ratio)[:opts.closest_pairs].numpy()
        figures.append(rd_rel(rd, pairs_grid(images[order], train.images[nb.nn_index[order].numpy()],
                                             out_dir / f"closest_pairs_{name}.png")))

    sets = {name: {"nn_distance": nb.nn_dist.numpy(), "carlini_ratio": nb.ratio.numpy()}
            for name, nb in per["pixel"].items()}
    figures.append(rd_rel(rd, nn_histograms(sets, out_dir / "nn_distances.png", mem.RATIO_THRESHOLD)))
    result["figures"] = figures
    return result, mem.per_image_table(per)


def rd_rel(rd: RunDir, path: Path) -> str:
    return str(Path(path).relative_to(rd.root))


def load_adapter(config, rd: RunDir, device) -> ProbeAdapter:
    """The family's probe adapter around the run's public pretrained model and its DP fine-tuned
    one (None when the run has none); the family is the one its checkpoint names."""
    from dpgen.models.registry import family
    from dpgen.sampling import load

    pre = load(rd.root, device=str(device), stage="pretrain")
    ft = load(rd.root, device=str(device), stage="finetune").model if rd.finetune_weights.is_file() else None
    return family(pre.family).probe_adapter(config, pre.model, ft)


def _membership(config, rd, train, val, adapter: ProbeAdapter, ctx, opts: AuditOptions, device, progress):
    la = opts.loss_attack
    X, Y = train.model_tensor(), torch.as_tensor(train.labels)
    XV, YV = val.model_tensor(), torch.as_tensor(val.labels)
    out: dict = {
        "attack": adapter.attack,
        "family": adapter.family,
        "members": f"private training images the run fine-tuned on ({train.name}/{train.split}, n={len(train)})",
        "non_members": f"private validation images, never trained on ({val.name}/{val.split}, n={len(val)})",
        "options": la.to_dict(),
    }
    raw: dict = {}
    limits = dp_tpr_limits(epsilon=ctx["epsilon"], delta=ctx["delta"],
                           events=None if not ctx.get("sigma") else ctx.get("events"),
                           neighbouring=ctx.get("neighbouring", "add_remove"))
    out["dp_limits"] = limits
    pre, ft = adapter.pre, adapter.ft
    if ft is None:
        out["note"] = "no fine-tuned weights: the cohort comes from the public-only pretrained model; attacked as is"
    mi, ni = mia.equal_size(len(X), len(XV), la.seed)
    scores = adapter.scores(ft if ft is not None else pre, pre if ft is not None else None, X[mi], Y[mi], XV[ni], YV[ni],
                            la, device, progress, "DP model")
    out["dp_model"] = mia.attack_results(scores, la.n_boot, la.seed)
    raw["dp_model"] = mia.raw_scores(scores)
    raw["dp_model"]["member_rows"] = mi.tolist()
    raw["dp_model"]["non_member_rows"] = ni.tolist()
    if opts.overfit_control:
        o = opts.overfit
        rng = np.random.default_rng(o.seed)
        sub = np.sort(rng.permutation(len(X))[:min(o.n_images, len(X))])
        model, info = adapter.overfit_control(X[sub], Y[sub], o, device, progress)
        mi2, ni2 = mia.equal_size(len(sub), len(XV), o.seed + 1)
        scores2 = adapter.scores(model, pre, X[sub][mi2], Y[sub][mi2], XV[ni2], YV[ni2], la, device, progress,
                                 "overfit control")
        res = mia.attack_results(scores2, la.n_boot, la.seed)
        key = out["dp_model"]["primary"]
        dp_auc = out["dp_model"]["scores"][key]
        of_auc = res["scores"][key]
        caught = of_auc["auc_ci"][0] > dp_auc["auc_ci"][1]
        out["overfit_control"] = {
            "what": f"the same pretrained model's {family_network(adapter)} trained WITHOUT DP (plain Adam) on a small "
                    f"private subset for many steps; the same attack must find it (shows the probe can fail)",
            "training": {**o.to_dict(), **info}, **res,
            "compared_on": key, "auc_dp_model": dp_auc["auc"], "auc_overfit": of_auc["auc"],
            "caught": bool(caught),
            "caught_criterion": "the overfit model's AUC interval lies entirely above the DP model's",
        }
        raw["overfit_control"] = mia.raw_scores(scores2)
        del model
    return out, raw


def family_network(adapter: ProbeAdapter) -> str:
    from dpgen.models.registry import family

    return family(adapter.family).dp_network


def _reconstruction(config, rd, train, adapter: ProbeAdapter, ctx, opts: AuditOptions, progress, out_dir: Path):
    io = opts.inversion
    sigma = float(ctx["sigma"] or 0.0)
    C = float(ctx["max_grad_norm"])
    X, Y = train.model_tensor(), torch.as_tensor(train.labels)
    rng = np.random.default_rng(io.seed)
    order = rng.permutation(len(X))
    pool = order[:max(io.pool_size, io.n_candidates)]
    Xp, Yp = X[pool], Y[pool]
    n_t = min(opts.attack_targets, len(pool))
    out: dict = {
        "threat_model": "white-box weights; one DP-SGD update whose batch holds only the target; known label "
                        "(and the row's known random draws: for the diffusion losses the timestep and noise, for the "
                        "discriminator loss the paired fake); update = clipped per-sample gradient "
                        "(+ Gaussian noise of std sigma*C per coordinate)",
        "sigma": sigma, "max_grad_norm": C, "options": io.to_dict(),
        "ledger_bound": ctx.get("ledger_bound"),
        "run_bound_at_candidate_prior": _run_bound_at(ctx, 1.0 / min(io.n_candidates, len(pool))),
        "targets": {},
    }
    internal: dict = {}
    figs = []
    t0 = time.time()
    targets = [(rec.classifier_target(train.image_shape, config.data.num_classes, io.seed), n_t, io,
                f"randomly initialised InversionCNN (seed {io.seed}): the start of training")]
    if opts.diffusion_inversion_targets > 0:
        io_g = rec.InversionOptions(**{**io.to_dict(), "iterations": opts.diffusion_inversion_iterations or io.iterations})
        targets.append((adapter.inversion_target(tuple(train.image_shape), io_g),
                        min(opts.diffusion_inversion_targets, n_t), io_g,
                        f"the pretrained (public-only) generator's {family_network(adapter)}: the weights at which "
                        f"fine-tuning's first DP-SGD update is computed"))
    for target, n_rows, o, weights in targets:
        res, inner = rec.run_target(target, Xp, Yp, list(range(n_rows)), sigma, C, o, progress=progress)
        res["weights"] = weights
        out["targets"][target.name] = res
        internal[target.name] = {c: {"rows": [int(pool[r]) for r in v["rows"]], "per_target": v["per_target"]}
                                 for c, v in inner.items()}
        safe = target.name.split("(")[0]
        figs.append(rd_rel(rd, reconstruction_grid(Xp[:n_rows], inner["no_noise"]["reconstructions"],
                                                   inner["run_noise"]["reconstructions"],
                                                   out_dir / f"reconstructions_{safe}.png")))
    out["figures"] = figs
    out["seconds"] = round(time.time() - t0, 1)
    ok = [t["conditions"]["no_noise"]["ssim_max"] > 0.5 or t["conditions"]["no_noise"]["inversion_identified"] > 0
          for t in out["targets"].values()]
    out["attack_works_without_noise"] = {name: bool(v) for name, v in zip(out["targets"], ok)}
    return out, internal


# ----------------------------------------------------------------------------- the stage


def audit_stage(config, rd: RunDir, device="auto", progress: bool = True, options: AuditOptions | None = None,
                cohort_path: str | Path | None = None, **opts) -> dict:
    """Run the probes on a finished run; write internal results, figures and the aggregate summary (internal: the data holder's review).

    Keyword options override fields of `AuditOptions` (e.g. `overfit_control=False`, `attack_targets=2`,
    `seed=1`). Returns the aggregate results (what `dpgen audit --json` prints).
    """
    options = options or AuditOptions()
    for k, v in opts.items():
        if not hasattr(options, k):
            raise TypeError(f"audit_stage: unknown option {k!r}")
        setattr(options, k, v)
    if "seed" in opts:
        options.loss_attack.seed = options.overfit.seed = options.inversion.seed = options.seed
    dev = resolve_device(device)
    t_start = time.time()
    rd = RunDir(Path(rd.root))
    out_dir = rd.audit_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    spec = config.data.private
    train = load_dataset(spec)  # what the run fine-tuned on (max_images respected)
    try:
        val = load_dataset(spec, split="val")
    except DataError as err:
        raise DataError(f"the audit needs the private data's 'val' split (held-out reference and non-members): {err}") from None
    if tuple(val.image_shape) != tuple(train.image_shape):
        raise DataError(f"private val images have shape {val.image_shape}, train {train.image_shape}")
    ctx = privacy_context(config, rd)

    results: dict = {
        "run_dir": str(rd.root), "internal": True, "contains_private_images": True, "privacy_note": PRIVACY_NOTE,
        "privacy": {k: ctx[k] for k in ("epsilon", "delta", "unit", "sigma", "sample_rate", "steps", "max_grad_norm")},
        "data": {"train": train.info(), "held_out": val.info(), "test_split_used": False},
        "options": options.to_dict(),
    }
    per_record: dict = {}
    if options.memorization:
        cpath = Path(cohort_path) if cohort_path else rd.cohort_file
        if not cpath.is_file():
            raise DataError(f"no cohort at {cpath} (continue the run: `{rd.next_command()}`)")
        cohort = load_npz(cpath, "train", name="cohort")
        if tuple(cohort.image_shape) != tuple(train.image_shape):
            raise DataError(f"the cohort {cpath} holds images of shape {cohort.image_shape}, the private data "
                            f"{train.image_shape}")
        t0 = time.time()
        results["memorization"], per_record["memorization"] = _memorization(
            config, rd, cohort, train, val, options, dev, progress, out_dir)
        results["memorization"]["cohort"] = str(cpath)
        results["memorization"]["seconds"] = round(time.time() - t0, 1)
    adapter = None
    if options.membership or options.reconstruction:
        adapter = load_adapter(config, rd, dev)
    if options.membership:
        t0 = time.time()
        results["membership"], per_record["membership"] = _membership(config, rd, train, val, adapter, ctx, options,
                                                                       dev, progress)
        results["membership"]["seconds"] = round(time.time() - t0, 1)
        results["membership"]["figures"] = [rd_rel(rd, _roc_figure(results["membership"], per_record["membership"],
                                                                   ctx, out_dir / "roc.png"))]
    if options.reconstruction:
        results["reconstruction"], per_record["reconstruction"] = _reconstruction(
            config, rd, train, adapter, ctx, options, progress, out_dir)
    results["seconds"] = round(time.time() - t_start, 1)
    results = to_jsonable(results)
    write_json_atomic(rd.probes_file, {**results, "per_record": to_jsonable(per_record)})
    summary = aggregate_summary(results)
    ProbesSummary.model_validate(summary)  # the schema the release review reads it with
    write_json_atomic(rd.probes_summary_file, summary)
    results["outputs"] = {"internal": rd_rel(rd, rd.probes_file), "summary": rd_rel(rd, rd.probes_summary_file),
                          "figures": rd_rel(rd, rd.audit_dir)}
    return results


def _roc_figure(mres: dict, raw: dict, ctx: dict, path: Path) -> Path:
    curves = {}
    for model_key, label in (("dp_model", "DP model"), ("overfit_control", "overfit control (no DP)")):
        if model_key not in raw:
            continue
        for score, vals in raw[model_key].items():
            if score not in mres[model_key]["scores"]:  # the member/non-member row indices
                continue
            fpr, tpr = roc_curve(np.asarray(vals["members"]), np.asarray(vals["non_members"]))
            curves[f"{label}, {score}"] = (fpr, tpr, mres[model_key]["scores"][score]["auc"])
    lim = mres["dp_limits"]
    pts = {row["fpr"]: row["mechanism_pld"] for row in lim["per_fpr"].values() if "mechanism_pld" in row}
    eps = ctx.get("epsilon")
    return roc_figure(curves, path, None if eps is None else (eps, ctx["delta"]), pts or None)


# ----------------------------------------------------------------------------- releasable summary


_SUMMARY_KEYS_MEM = ("n", "k", "nn_distance", "carlini_ratio", "near_copies", "near_copy_fraction", "near_copy_fraction_ci",
                     "max_correlation", "high_correlation", "high_correlation_fraction", "high_correlation_fraction_ci")


def _no_tails(v):
    """Quantile dicts without the 5% tail (close to single records in small sets)."""
    return {k: x for k, x in v.items() if k != "q05"} if isinstance(v, dict) else v


def _attack_summary(r: dict) -> dict:
    return {"n_members": r["n_members"], "n_non_members": r["n_non_members"], "auc": r["auc"], "auc_ci": r["auc_ci"],
            "tpr_at_fpr": {k: {"fpr": v["fpr"], "tpr": v["tpr"], "ci": v["ci"]} for k, v in r["tpr_at_fpr"].items()}}


def aggregate_summary(results: dict) -> dict:
    """Aggregate numbers only: built field by field from an allow-list, so nothing per-record slips in."""
    s: dict = {"kind": "privacy_probes_summary", "contains_private_images": False, "internal": True,
               "privacy_note": PRIVACY_NOTE, "privacy": results.get("privacy"),
               "details": "probes.json beside this file (per record)"}
    if "memorization" in results:
        m = results["memorization"]
        s["memorization"] = {"criteria": m["criteria"], "flagged": m["flagged"], "verdict": m["verdict"],
                             "n_train": m["n_train"], "spaces": {}}
        for space, e in m["spaces"].items():
            s["memorization"]["spaces"][space] = {
                name: {k: _no_tails(e[name][k]) for k in _SUMMARY_KEYS_MEM if k in e[name]}
                for name in ("synthetic", "held_out") if name in e
            }
            if "comparison" in e:
                s["memorization"]["spaces"][space]["comparison"] = e["comparison"]
    if "membership" in results:
        mm = results["membership"]
        s["membership"] = {"attack": mm["attack"], "dp_limits": mm["dp_limits"],
                           "dp_model": {k: _attack_summary(v) for k, v in mm["dp_model"]["scores"].items()},
                           "primary_score": mm["dp_model"]["primary"]}
        if "overfit_control" in mm:
            oc = mm["overfit_control"]
            s["membership"]["overfit_control"] = {
                "scores": {k: _attack_summary(v) for k, v in oc["scores"].items()}, "caught": oc["caught"],
                "caught_criterion": oc["caught_criterion"], "n_images": oc["training"]["n_images"],
                "steps": oc["training"]["steps"]}
    if "reconstruction" in results:
        r = results["reconstruction"]
        s["reconstruction"] = {"threat_model": r["threat_model"], "ledger_bound": r["ledger_bound"],
                               "run_bound_at_candidate_prior": r["run_bound_at_candidate_prior"], "targets": {}}
        for name, t in r["targets"].items():
            s["reconstruction"]["targets"][name] = {
                "attack_bound": t["attack_bound"],
                "conditions": {c: {k: v[k] for k in ("sigma", "max_grad_norm", "n_targets", "ssim_mean", "ncc_mean",
                                                       "inversion_identification_rate", "identification_by_gradient")}
                               for c, v in t["conditions"].items()},
            }
    return s


# ----------------------------------------------------------------------------- text


def _f(v, nd=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.{nd}f}"


def _ci(ci) -> str:
    return f"[{_f(ci[0])}, {_f(ci[1])}]"


def format_summary(results: dict) -> str:
    p = results["privacy"]
    eps = p.get("epsilon")
    lines = [f"privacy probes of {results['run_dir']} (epsilon {_f(eps)} at delta {p.get('delta')}, "
             f"{p.get('unit') or 'unit unknown'}; sigma {_f(p.get('sigma'))}, C {p.get('max_grad_norm')})"]
    m = results.get("memorization")
    if m:
        lines.append(f"memorization vs {m['n_train']} private training images (held-out reference: private val):")
        for space, e in m["spaces"].items():
            sy, ho = e["synthetic"], e.get("held_out")
            line = (f"  {space}: synthetic n={sy['n']}: near-copies (Carlini ratio < {mem.RATIO_THRESHOLD:.3g}) "
                    f"{sy['near_copies']} ({100 * sy['near_copy_fraction']:.1f}%)")
            if ho:
                line += f" vs held-out {ho['near_copies']}/{ho['n']} ({100 * ho['near_copy_fraction']:.1f}%)"
            line += f"; median NN distance {_f(sy['nn_distance']['median'])}"
            if ho:
                line += f" (held-out {_f(ho['nn_distance']['median'])})"
            lines.append(line)
            if "high_correlation" in sy:
                line = (f"  {space}: max correlation > {mem.CORR_THRESHOLD}: synthetic {sy['high_correlation']} "
                        f"({100 * sy['high_correlation_fraction']:.1f}%)")
                if ho:
                    line += f" vs held-out {ho['high_correlation']}/{ho['n']} ({100 * ho['high_correlation_fraction']:.1f}%)"
                lines.append(line)
        lines.append(f"  verdict: {m['verdict']}")
    mm = results.get("membership")
    if mm:
        lim = mm["dp_limits"]
        lines.append("membership inference (members: private train, non-members: private val):")
        for label, block in (("DP model", mm["dp_model"]), ("overfit control (no DP)", mm.get("overfit_control"))):
            if not block:
                continue
            for score, r in block["scores"].items():
                tprs = "; ".join(
                    f"TPR@{k} FPR {_f(v['tpr'])} {_ci(v['ci'])}" for k, v in r["tpr_at_fpr"].items())
                lines.append(f"  {label}, {score} attack (n={r['n_members']}+{r['n_non_members']}): "
                             f"AUC {_f(r['auc'])} {_ci(r['auc_ci'])}; {tprs}")
        lim_s = "; ".join(f"TPR@{k} <= {_f(v.get('mechanism_pld'))} (run's DP-SGD, PLD), <= {_f(v.get('eps_delta'))} "
                          f"(eps, delta)" for k, v in lim["per_fpr"].items())
        lines.append(f"  DP limits: {lim_s}; AUC <= {_f(lim.get('auc_eps_delta'))}")
        oc = mm.get("overfit_control")
        if oc:
            lines.append(f"  overfit control ({oc['training']['n_images']} images, {oc['training']['steps']} Adam steps, no DP): "
                         f"AUC {_f(oc['auc_overfit'])} vs DP model {_f(oc['auc_dp_model'])} ({oc['compared_on']} attack): "
                         f"{'CAUGHT' if oc['caught'] else 'NOT caught'}")
    r = results.get("reconstruction")
    if r:
        lb = r.get("ledger_bound")
        if lb:
            lines.append(f"reconstruction bound (ledger, whole run): P[success] <= {_f(lb['bound'])} at prior kappa "
                         f"{lb['kappa']:.3g}")
        rb = r.get("run_bound_at_candidate_prior")
        if rb:
            lines.append(f"  whole run at kappa {rb['kappa']:.3g} (1/candidates): <= {_f(rb['bound'])}")
        for name, t in r["targets"].items():
            nn_, rn = t["conditions"]["no_noise"], t["conditions"]["run_noise"]
            gi0, gi1 = nn_["identification_by_gradient"], rn["identification_by_gradient"]
            lines.append(f"  gradient inversion, {name}: without noise SSIM {_f(nn_['ssim_mean'])} (max {_f(nn_['ssim_max'])}), "
                         f"identified {nn_['inversion_identified']}/{nn_['n_targets']}; with the run's noise (sigma "
                         f"{_f(rn['sigma'])}) SSIM {_f(rn['ssim_mean'])}, identified {rn['inversion_identified']}/{rn['n_targets']}")
            lines.append(f"    identification among {gi1['n_candidates']} candidates by gradient matching: "
                         f"{100 * gi0['success_rate']:.0f}% without noise, {100 * gi1['success_rate']:.1f}% "
                         f"{_ci([100 * c for c in gi1['success_ci']])}% with noise; bound for this release "
                         f"{100 * t['attack_bound']['bound']:.1f}% (prior {100 * gi1['prior_kappa']:.0f}%)")
    out = results.get("outputs", {})
    lines.append(f"results (internal: never share): {out.get('internal')}, summary {out.get('summary')}, "
                 f"figures in {out.get('figures')}/")
    return "\n".join(lines)


__all__ = ["AuditOptions", "audit_stage", "format_summary", "aggregate_summary", "privacy_context",
]
