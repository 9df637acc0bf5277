"""Figures of the evaluation (matplotlib, Agg backend; PNG written atomically).

`utility_figure`, `fidelity_figure` and `feature_scatter` go to RUN/internal/evaluation/ with
evaluation.json (computed on private data, never released); `feature_scatter` plots one point
per image, private images included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpgen.plotting import pyplot as _plt
from dpgen.plotting import save_png as _save


def utility_figure(rows: dict, path: str | Path, title: str = "") -> Path:
    """ROC-AUC and balanced accuracy (mean +- std over seeds) of the utility rows."""
    plt = _plt()
    import textwrap

    names = list(rows)
    labels = []
    for r in names:
        eps = rows[r].get("privacy", {}).get("epsilon")
        eps_s = "unknown" if eps is None else eps if isinstance(eps, str) else f"{eps:.3g}"
        labels.append(textwrap.fill(rows[r]["label"], 24) + f"\nepsilon = {eps_s}")
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    x = np.arange(len(names))
    for j, (metric, color) in enumerate((("roc_auc", "#3b6ea8"), ("balanced_accuracy", "#d08c2c"))):
        mean = [rows[r][metric]["mean"] if rows[r][metric]["mean"] is not None else np.nan for r in names]
        std = [rows[r][metric]["std"] or 0.0 for r in names]
        ax.bar(x + (j - 0.5) * 0.38, mean, 0.36, yerr=std, capsize=3, color=color,
               label=metric.replace("_", " ").replace("roc auc", "ROC-AUC"))
    ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="chance (0.5)")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("tested on private test split")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title or "downstream utility (mean +- std over seeds)", fontsize=9)
    return _save(fig, Path(path))


def fidelity_figure(fidelity: dict, path: str | Path) -> Path:
    """Each metric: cohort vs the real-vs-real reference, overall and per class."""
    plt = _plt()
    groups = {"all": fidelity["overall"], **{f"class {k}": v for k, v in fidelity["per_class"].items()}}
    metric_names = list(fidelity["overall"]["metrics"])
    fig, axes = plt.subplots(1, len(metric_names), figsize=(2.3 * len(metric_names), 3.0))
    axes = np.atleast_1d(axes)
    x = np.arange(len(groups))
    for ax, m in zip(axes, metric_names):
        for j, (key, color, lab) in enumerate((("cohort", "#3b6ea8", "cohort"),
                                               ("real_vs_real", "#8c8c8c", "real vs real"))):
            vals = [g["metrics"][m][key] for g in groups.values()]
            errs = [g["metrics"][m][f"{key}_std"] or 0.0 for g in groups.values()]
            vals = [np.nan if v is None else v for v in vals]
            ax.bar(x + (j - 0.5) * 0.38, vals, 0.36, yerr=errs, capsize=2, color=color, label=lab)
        ax.set_title(f"{m}\n({fidelity['overall']['metrics'][m]['better']} is better)", fontsize=8)
        ax.set_xticks(x)
        ax.set_xticklabels(list(groups), fontsize=7, rotation=30)
        ax.tick_params(axis="y", labelsize=7)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"fidelity vs {fidelity['real_set']}; reference: {fidelity['reference_set']}", fontsize=9)
    fig.tight_layout()
    return _save(fig, Path(path))


def feature_scatter(sets: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """2D PCA (fitted on the first set) of several feature sets. Shows private data: internal only."""
    plt = _plt()
    first = next(iter(sets.values()))
    mu = first.mean(0)
    _, _, vt = np.linalg.svd(first - mu, full_matrices=False)
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    for (name, f), color in zip(sets.items(), ("#8c8c8c", "#3b6ea8", "#d08c2c", "#5a9e5a")):
        p = (f - mu) @ vt[:2].T
        ax.scatter(p[:, 0], p[:, 1], s=4, alpha=0.5, color=color, label=f"{name} (n={len(f)})")
    ax.legend(fontsize=7, markerscale=3)
    ax.set_title(title or "features, first two principal components", fontsize=9)
    return _save(fig, Path(path))
