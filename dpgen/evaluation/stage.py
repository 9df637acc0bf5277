"""The evaluate stage: fidelity (with real-vs-real references) and downstream utility.

Order of work, chosen so that the private test split cannot influence any choice:

1. read the cohort, the private train and val splits; check them against each other;
2. build the feature extractor (the public encoder is trained on public data only) and extract
   features of the cohort and of private train;
3. train every utility classifier (selection on private val for the non-private ceiling, on a
   held-out synthetic split for the synthetic row, none for the DP rows);
4. only now read the private test split: it is the real-vs-real reference for fidelity and the
   test set of the frozen classifiers.

Outputs, all under RUN/internal/evaluation/ (never released): evaluation.json, the figures
fidelity.png, utility.png and features_pca.png. Every number here is computed on private data
(train, val and test splits) without DP: it is the data holder's evidence for the internal
release review, never part of a bundle or of the shareable report. The DP classifiers of the
utility rows are mechanisms on the private data: they run on the one DP-SGD loop with secret
randomness and are recorded in the ledger as internal mechanisms (their own epsilon, composed
into nothing released, because their only outputs stay here).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from dpgen.core.device import resolve_device
from dpgen.core.naming import class_name
from dpgen.core.schemas import EvaluationResults
from dpgen.data import DataError
from dpgen.evaluation import fidelity as fid
from dpgen.evaluation.features import ENCODER_EPOCHS, FeatureExtractor, build_extractor, classifier_extractor, extract_features
from dpgen.evaluation.inputs import check_cohort, check_real, load_cohort, load_real, require_split
from dpgen.evaluation.utility import ROW_LABELS, ROWS, UtilityOptions, class_signal, evaluate_rows, train_rows
from dpgen.privacy import accounting, mechanisms
from dpgen.privacy.ledger import PrivacyLedger
from dpgen.privacy.randomness import EVALUATION_SECRET, secret_streams
from dpgen.privacy.schema import InternalRunEntry
from dpgen.rundir import RunDir, to_jsonable, write_json_atomic

PRIVACY_NOTE = (
    "INTERNAL: computed on the private data (train, val and test splits) without differential privacy. "
    "For the data holder's internal release review only; never part of a release bundle or of the shareable "
    "report. The DP classifiers' epsilons are their own (each is a separate mechanism, composed into nothing "
    "that is released); the cohort's guarantee is the run's ledger."
)


@dataclass
class EvalOptions:
    fidelity: bool = True
    utility: bool = True
    feature_batch_size: int = 500
    fidelity_repeats: int = 5  # subsample draws for the size-matched comparison
    prdc_k: int = 5
    kid_subsets: int = 50
    encoder_epochs: int = ENCODER_EPOCHS
    seed: int = 0
    utility_options: UtilityOptions = field(default_factory=UtilityOptions)

    def to_dict(self) -> dict:
        return asdict(self)


def privacy_context(config, rd: RunDir, cohort_override: bool, target_epsilon: float | None = None) -> dict:
    """What the cohort cost (from the run's ledger) and the epsilon the DP rows are compared at.

    The DP rows are compared at `target_epsilon` (default: the run's budget, privacy.epsilon): the
    DP-SGD baseline spends it on its own; the synthetic-pretrain + DP fine-tune row gets what the
    cohort left of it (its sigma calibrated so that the cohort's ledger events and the fine-tune
    compose to the target: a split budget). A cohort that spent its whole budget leaves nothing:
    run the generator with a share of the budget (e.g. privacy.epsilon=7) and evaluate with
    --target-epsilon 10 to compare both at 10.
    """
    delta = config.privacy.delta
    ctx: dict = {"delta": delta, "configured_epsilon": config.privacy.epsilon, "cohort_epsilon": None,
                 "cohort_events": None, "ledger": None}
    ledger = PrivacyLedger(rd.ledger_path)
    ctx["neighbouring"] = config.privacy.neighbouring
    if cohort_override:
        ctx["note"] = "the cohort was given with --cohort; the run's ledger does not describe it, its epsilon is unknown"
    elif not ledger.exists():
        ctx["note"] = f"no privacy ledger at {rd.ledger_path}; the cohort's epsilon is unknown"
    else:
        summary = ledger.summary(delta)
        ctx["cohort_epsilon"] = summary.epsilon
        ctx["cohort_epsilon_rdp"] = summary.epsilon_rdp
        ctx["cohort_events"] = summary.events
        ctx["ledger"] = str(Path(rd.ledger_path).relative_to(rd.root))
    ctx["dp_rows_epsilon"] = float(target_epsilon) if target_epsilon is not None else config.privacy.epsilon
    ctx["dp_rows_epsilon_source"] = ("--target-epsilon" if target_epsilon is not None
                                     else "the run's budget (privacy.epsilon)")
    return ctx


def _class_sets(feats: torch.Tensor, labels: np.ndarray, k: int) -> torch.Tensor:
    return feats[torch.as_tensor(np.flatnonzero(labels == k))]


def _compare_in_spaces(spaces: list[FeatureExtractor], real: list, cohort: list, reference: list, **kw) -> dict:
    """`fid.compare_to_reference` in each feature space; one group whose metrics are labelled by
    space (FD[public-encoder], FD[real-classifier], ...). The sample sizes are the same in every space."""
    out: dict = {}
    for space, r, c, ref in zip(spaces, real, cohort, reference):
        res = fid.compare_to_reference(r, c, ref, **kw)
        metrics = {space.label(m): v for m, v in res.pop("metrics").items()}
        out = {**res, "metrics": {**out.get("metrics", {}), **metrics}}
    return out


def evaluate_stage(config, rd: RunDir, device="auto", progress: bool = True, *, cohort_path=None,
                   feature_extractor="public-encoder", inception_weights=None, seeds: int | None = None,
                   options: EvalOptions | None = None, write: bool = True, target_epsilon: float | None = None) -> dict:
    """Evaluate the run's cohort; writes RUN/internal/evaluation/ (evaluation.json, figures); returns the metrics."""
    rd = rd if isinstance(rd, RunDir) else RunDir(Path(rd))
    opts = copy.deepcopy(options) if options is not None else EvalOptions()
    if seeds is not None:
        opts.utility_options.seeds = int(seeds)
    if opts.utility_options.seeds < 1:
        raise DataError(f"--seeds {opts.utility_options.seeds}: need at least one seed")
    dev = resolve_device(device)
    k, names = config.data.num_classes, config.data.class_names
    timing: dict[str, float] = {}
    t0 = time.time()

    # 1. inputs (never the test split)
    cohort = load_cohort(rd.root, cohort_path)
    private = config.data.private
    train = load_real(private, private.split, against=cohort)
    check_real(train, k, names)
    check_cohort(cohort, train, k, names)
    require_split(private, "test", against=cohort)
    val_note = None
    try:  # the private val split only drives the ceiling's epoch selection; it may be absent
        val = load_real(private, "val", against=cohort)
    except DataError as err:
        val, val_note = None, f"no private val split ({err}); the ceiling row uses its last epoch"
    if val is not None:
        check_real(val, k, names, need_all_classes=False)
    metrics: dict = {
        "run_dir": str(rd.root),
        "cohort": {"path": cohort.path, "n": len(cohort), "image_shape": list(cohort.image_shape),
                   "class_counts": {class_name(c, names): int((cohort.labels == c).sum()) for c in range(k)},
                   "override": cohort_path is not None},
        "real_data": {"private": train.name, "train_split": train.split, "n_train": len(train),
                      "n_val": None if val is None else len(val), **({"note": val_note} if val_note else {})},
        "privacy_note": PRIVACY_NOTE,
    }
    timing["inputs_s"] = time.time() - t0

    # 2. features
    extractor = f_cohort = f_train = None
    if opts.fidelity:
        t = time.time()
        extractor = build_extractor(feature_extractor, config, rd, train.image_shape, device=dev, progress=progress,
                                    inception_weights=inception_weights, encoder_epochs=opts.encoder_epochs)
        timing["feature_extractor_s"] = time.time() - t
        t = time.time()

        def features(space: FeatureExtractor, ds, what: str) -> torch.Tensor:
            return extract_features(space, ds.images, batch_size=opts.feature_batch_size, device=dev,
                                    progress=progress, desc=f"{space.name}: {what}",
                                    intensity_range=getattr(ds, "intensity_range", None))

        spaces = [extractor]  # + the real-data classifier's space once it is trained (step 4)
        f_cohort, f_train = [features(extractor, cohort, "cohort")], [features(extractor, train, "private train")]
        timing["features_s"] = time.time() - t

    # 3. utility classifiers (trained and frozen before the test split is read)
    privacy = privacy_context(config, rd, cohort_path is not None, target_epsilon)
    trained = None
    if opts.utility:
        t = time.time()
        trained = train_rows(cohort, train, val, k, epsilon=privacy["dp_rows_epsilon"], delta=config.privacy.delta,
                             secret=secret_streams(rd.internal, EVALUATION_SECRET), opts=opts.utility_options,
                             device=dev, progress=progress, neighbouring=config.privacy.neighbouring,
                             finetune_within=privacy["cohort_events"])
        timing["utility_training_s"] = time.time() - t
        if write:
            record_internal_mechanisms(rd, trained, config)

    # 4. the final evaluation: the private test split is read here and only here
    t = time.time()
    test = load_real(private, "test", against=cohort)
    check_real(test, k, names)
    if tuple(test.image_shape) != tuple(train.image_shape):
        raise DataError(f"the private test split {test.path} has shape {test.image_shape}, train has {train.image_shape}")
    metrics["real_data"]["n_test"] = len(test)
    metrics["protocol"] = {
        "test_split_read": "once, after every classifier was trained and frozen",
        "selection": {
            "real": "best epoch by ROC-AUC on the private val split (non-private ceiling)"
            if val is not None else "last epoch (no private val split)",
            "dp_real": f"none: fixed {opts.utility_options.dp_epochs} epochs",
            "synthetic": f"best epoch by ROC-AUC on a held-out {opts.utility_options.synthetic_val_fraction:.0%} "
                         f"of the cohort",
            "synthetic_then_dp_real": f"none: fixed {opts.utility_options.finetune_epochs} epochs of DP fine-tuning",
        },
    }
    figures = []
    if opts.fidelity:
        if trained is not None and trained.models.get("real"):
            # The second space: the public encoder does not know the private classes (a set of one
            # class only scored like real in it); the ceiling classifier's features do
            # (benchmarks/fidelity_controls.py).
            spaces.append(classifier_extractor(trained.models["real"][0]))
            f_cohort.append(features(spaces[-1], cohort, "cohort"))
            f_train.append(features(spaces[-1], train, "private train"))
        f_test = [features(s, test, "private test") for s in spaces]
        timing["features_s"] += time.time() - t
        t = time.time()
        kw = {"repeats": opts.fidelity_repeats, "k": opts.prdc_k, "seed": opts.seed, "kid_subsets": opts.kid_subsets}
        overall = _compare_in_spaces(spaces, f_train, f_cohort, f_test, **kw)
        per_class = {}
        for c in range(k):
            per_class[class_name(c, names)] = _compare_in_spaces(
                spaces, *([_class_sets(f, lab, c) for f in fs]
                          for fs, lab in ((f_train, train.labels), (f_cohort, cohort.labels), (f_test, test.labels))), **kw)
        metrics["fidelity"] = {
            "feature_extractor": extractor.to_dict(),
            "other_feature_spaces": [s.to_dict() for s in spaces[1:]],
            "real_set": f"private {train.split} (n={len(train)})",
            "reference_set": f"private test (n={len(test)}) vs private {train.split}",
            "how": ("cohort vs private train, beside held-out real (private test) vs private train, both at the same "
                    "sample size n_matched (the larger set subsampled; mean and std over draws); cohort_full is the "
                    "whole cohort. Each metric is labelled by its feature space: the chosen extractor, and "
                    "real-classifier (the ceiling classifier's penultimate layer, which knows the classes; "
                    "benchmarks/fidelity_controls.py; it is fitted to private train, so a cohort closer to "
                    "private train than the real-vs-real reference there is a memorisation warning for the "
                    "probes, not a success). FD and KID come from torchmetrics on these features; "
                    "precision/recall/density/"
                    f"coverage are Naeem et al. 2020 with k={opts.prdc_k}; diversity is the mean pairwise feature "
                    "distance of the set over that of private train (1 = as varied as the real images)."),
            "overall": overall,
            "per_class": per_class,
        }
        timing["fidelity_metrics_s"] = time.time() - t
    if opts.utility:
        rows = evaluate_rows(trained, test, k, names, device=dev, batch_size=opts.utility_options.eval_batch_size)
        _attach_privacy(rows, trained, privacy, config.privacy.delta)
        metrics["utility"] = {
            "test_set": f"private test (n={len(test)})",
            "seeds": opts.utility_options.seeds,
            "spread": "std over seeds (ddof=1)",
            "privacy_unit": trained.info["privacy_unit"],
            "rows": rows,
            "comparison": compare_rows(rows),
            "options": trained.info["options"],
            "dp_rows_epsilon": privacy["dp_rows_epsilon"],
        }
        if trained.info.get("finetune_skipped"):
            metrics["utility"]["finetune_skipped"] = ("the cohort already spends the target epsilon "
                                                      f"{privacy['dp_rows_epsilon']:g}: nothing is left for a split budget")
        signal = class_signal(trained, cohort, k, names, device=dev, batch_size=opts.utility_options.eval_batch_size)
        if signal is not None:
            metrics["class_signal"] = signal
    metrics["privacy"] = {k_: v for k_, v in privacy.items() if k_ != "cohort_events"}
    timing["total_s"] = time.time() - t0
    metrics["timing"] = {k_: round(v, 2) for k_, v in timing.items()}

    if write:
        out_dir = rd.evaluation_dir
        if opts.fidelity:
            from dpgen.evaluation.figures import feature_scatter, fidelity_figure

            figures.append(fidelity_figure(metrics["fidelity"], out_dir / "fidelity.png"))
            figures.append(feature_scatter(
                {f"private {train.split}": f_train[0].numpy(), "cohort": f_cohort[0].numpy(),
                 "private test": f_test[0].numpy()},
                out_dir / "features_pca.png", title=f"{extractor.name} features (internal: private data)"))
        if opts.utility:
            from dpgen.evaluation.figures import utility_figure

            figures.append(utility_figure(metrics["utility"]["rows"], out_dir / "utility.png"))
        metrics["figures"] = [str(Path(p).relative_to(rd.root)) for p in figures]
        metrics = to_jsonable(metrics)
        EvaluationResults.model_validate(metrics)  # the schema the release review reads it with
        write_json_atomic(rd.evaluation_file, metrics)
        try:
            rd.mark_done("evaluate", {"metrics": str(rd.evaluation_file.relative_to(rd.root))})
        except OSError:  # pragma: no cover - a read-only state file must not lose the metrics
            pass
    return to_jsonable(metrics)


def record_internal_mechanisms(rd: RunDir, trained, config) -> None:
    """Every DP classifier trained on the private data is a mechanism: into the ledger, as
    internal (its only outputs are the metrics under internal/evaluation/)."""
    ledger = PrivacyLedger(rd.ledger_path)
    outputs = str(rd.evaluation_file.relative_to(rd.root))
    for name, key in ((mechanisms.EVALUATION_BASELINE, "dp_real"), (mechanisms.EVALUATION_FINETUNE, "synthetic_then_dp_real")):
        plan = trained.info["dp_baseline_plan" if key == "dp_real" else "dp_finetune_plan"]
        if plan is None or key not in trained.models or not trained.models[key]:
            continue
        ledger.append(InternalRunEntry(
            mechanism=name, event=plan.event(), repeats=len(trained.models[key]), epsilon_each=plan.epsilon_pld,
            delta=plan.delta, neighbouring=plan.neighbouring, outputs=outputs, unit=trained.info["privacy_unit"],
            n_units=plan.n_units))


def compare_rows(rows: dict) -> dict:
    """Does the cohort buy anything? ROC-AUC of the synthetic rows minus the DP-SGD baseline's.

    A cohort is worth releasing for this task when a classifier trained on it beats DP-SGD on
    the real data at the same epsilon (the "synthetic" row). The fine-tuning row spends more
    (its epsilon is composed), so beating the baseline there is weaker evidence.
    """
    def auc(r):
        return rows.get(r, {}).get("roc_auc", {}).get("mean")

    out = {"metric": "ROC-AUC (mean over seeds)"}
    base = auc("dp_real")
    for r in ("synthetic", "synthetic_then_dp_real"):
        if base is not None and auc(r) is not None:
            out[f"{r}_minus_dp_real"] = auc(r) - base
    if base is not None and auc("synthetic") is not None:
        out["synthetic_beats_dp_baseline"] = bool(auc("synthetic") > base)
    if auc("real") is not None and base is not None:
        out["dp_real_gap_to_ceiling"] = auc("real") - base
    return out


def _attach_privacy(rows: dict, trained, privacy: dict, delta: float) -> None:
    def as_dict(p):
        return None if p is None else {"sigma": p.sigma, "sample_rate": p.sample_rate, "steps": p.steps,
                                       "epsilon": p.epsilon_pld, "target_epsilon": p.epsilon_pld, "event": p.event()}

    base, ft = as_dict(trained.info["dp_baseline_plan"]), as_dict(trained.info["dp_finetune_plan"])
    cohort_eps, events = privacy["cohort_epsilon"], privacy["cohort_events"]
    cohort_desc = "unknown (no ledger)" if cohort_eps is None else cohort_eps
    if "real" in rows:
        rows["real"]["privacy"] = {"epsilon": math.inf, "note": "no privacy: the ceiling"}
    if "dp_real" in rows:
        rows["dp_real"]["privacy"] = {"epsilon": base["epsilon"], "target_epsilon": base["target_epsilon"],
                                      "delta": delta, "sigma": base["sigma"], "sample_rate": base["sample_rate"],
                                      "steps": base["steps"], "unit": trained.info["privacy_unit"],
                                      "note": f"DP-SGD at {privacy['dp_rows_epsilon_source']}; each classifier is a "
                                              f"separate mechanism with this epsilon (internal: never released)"}
    if "synthetic" in rows:
        rows["synthetic"]["privacy"] = {"epsilon": cohort_eps, "delta": delta,
                                        "note": f"post-processing of the cohort (epsilon {cohort_desc})"}
    if "synthetic_then_dp_real" in rows:
        split = events is not None
        own = accounting.epsilon([ft["event"]], delta, "pld", privacy["neighbouring"]) if ft["sigma"] > 0 else math.inf
        rows["synthetic_then_dp_real"]["privacy"] = {
            "budget": "split" if split else "not split (the cohort's epsilon is unknown)",
            "epsilon": ft["epsilon"] if split else None,
            "epsilon_cohort": cohort_eps,
            "epsilon_classifier_finetune": own,
            "delta": delta, "sigma": ft["sigma"], "sample_rate": ft["sample_rate"], "steps": ft["steps"],
            "unit": trained.info["privacy_unit"],
            "note": ("a split budget: the classifier's DP-SGD fine-tuning is calibrated so that the cohort's ledger "
                     f"events and it compose to {privacy['dp_rows_epsilon']:g} (PLD), the DP-SGD baseline's epsilon"
                     if split else "the cohort's epsilon is unknown: the fine-tuning alone is calibrated to the "
                                   "baseline's epsilon, and the total is unknown"),
        }


# ----------------------------------------------------------------------------- printing


def _num(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if math.isinf(v):
        return "inf"
    return f"{v:.{digits}g}"


def _pm(mean, std, digits: int = 4) -> str:
    if mean is None:
        return "-"
    if isinstance(mean, str):
        return mean
    show_std = std is not None and std > 1e-12 * max(1.0, abs(mean))
    return _num(mean, digits) + (f" ± {_num(std, 2)}" if show_std else "")


def format_summary(metrics: dict) -> str:
    lines = [f"evaluation of {metrics['run_dir']}",
             f"cohort: {metrics['cohort']['n']} images {metrics['cohort']['class_counts']} ({metrics['cohort']['path']})"]
    fidelity = metrics.get("fidelity")
    if fidelity:
        for fx in [fidelity["feature_extractor"], *fidelity.get("other_feature_spaces", [])]:
            lines.append(f"feature space: {fx['name']} - {fx['description']}")
        o = fidelity["overall"]
        lines.append(f"fidelity vs {fidelity['real_set']}; real-vs-real reference: {fidelity['reference_set']}; "
                     f"n matched = {o['n_matched']}")
        groups = {"all": o, **{f"class {c}": v for c, v in fidelity["per_class"].items()}}
        gl = {g: f"{g} (n={v['n_matched']})" for g, v in groups.items()}
        wm, wg = max(map(len, o["metrics"])) + 2, max(map(len, gl.values())) + 2
        lines.append(f"  {'metric':<{wm}}{'group':<{wg}}{'cohort':>20}{'real vs real':>20}{'full cohort':>13}  better")
        for m in o["metrics"]:
            for gname, g in groups.items():
                v = g["metrics"][m]
                lines.append(f"  {m:<{wm}}{gl[gname]:<{wg}} {_pm(v['cohort'], v['cohort_std']):>19}"
                             f" {_pm(v['real_vs_real'], v['real_vs_real_std']):>19} {_num(v['cohort_full']):>12}  {v['better']}")
    utility = metrics.get("utility")
    if utility:
        lines.append(f"downstream utility, tested on {utility['test_set']}, {utility['seeds']} seed(s), mean ± std:")
        lines.append(f"  {'row':<48}{'epsilon':>10}{'ROC-AUC':>18}{'accuracy':>18}{'bal. accuracy':>18}  recall per class")
        for r, row in utility["rows"].items():
            eps = row.get("privacy", {}).get("epsilon")
            eps_s = _num(eps, 3) if eps is not None else "unknown"
            recall = ", ".join(f"{c} {_num(v['mean'], 3)}" for c, v in row["recall_per_class"].items())
            flag = f"  [{row['seeds_predicting_one_class']} seed(s) predict one class only]" \
                if row["seeds_predicting_one_class"] else ""
            lines.append(f"  {row['label']:<48}{eps_s:>10} {_pm(row['roc_auc']['mean'], row['roc_auc']['std']):>17}"
                         f" {_pm(row['accuracy']['mean'], row['accuracy']['std']):>17}"
                         f" {_pm(row['balanced_accuracy']['mean'], row['balanced_accuracy']['std']):>17}  {recall}{flag}")
        cmp_ = utility.get("comparison", {})
        if "synthetic_beats_dp_baseline" in cmp_:
            verdict = "beats" if cmp_["synthetic_beats_dp_baseline"] else "does NOT beat"
            lines.append(f"  the synthetic cohort {verdict} DP-SGD on the real data at the same epsilon "
                         f"(ROC-AUC {cmp_['synthetic_minus_dp_real']:+.3f})")
        ft = utility["rows"].get("synthetic_then_dp_real", {}).get("privacy")
        if ft:
            lines.append(f"  (synthetic + DP fine-tune, split budget: cohort {_num(ft['epsilon_cohort'], 3)} and classifier "
                         f"fine-tuning {_num(ft['epsilon_classifier_finetune'], 3)} compose to {_num(ft['epsilon'], 3)})")
        if utility.get("finetune_skipped"):
            lines.append(f"  synthetic + DP fine-tune: not run ({utility['finetune_skipped']}); run the generator with a "
                         f"share of the budget and evaluate with --target-epsilon")
    signal = metrics.get("class_signal")
    if signal:
        per = ", ".join(f"{c} {_pm(v['mean'], v['std'], 3)}" for c, v in signal["accuracy_per_class"].items())
        lines.append(f"class signal (real-data classifiers on the cohort, accuracy per class): {per}; balanced "
                     f"{_pm(signal['balanced_accuracy']['mean'], signal['balanced_accuracy']['std'], 3)}")
    if metrics.get("figures"):
        lines.append("figures: " + ", ".join(metrics["figures"]))
    lines.append(f"metrics (internal: never share): {RunDir(Path(metrics['run_dir'])).evaluation_file}")
    return "\n".join(lines)


__all__ = ["EvalOptions", "evaluate_stage", "format_summary", "privacy_context", "compare_rows", "ROWS", "ROW_LABELS"]
