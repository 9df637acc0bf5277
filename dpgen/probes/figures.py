"""Figures of the privacy probes. Every one of them shows private images or per-record values,
so they are written to RUN/internal/audit/ only (never released)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpgen.data.cohort import image_grid, write_png
from dpgen.plotting import pyplot as _plt
from dpgen.plotting import save_png as _save


def _u8(x) -> np.ndarray:
    """Model-range float tensors/arrays -> uint8; uint8 passes through."""
    a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    if a.dtype == np.uint8:
        return a
    return ((np.clip(a, -1, 1) + 1) * 127.5).round().astype(np.uint8)


def pairs_grid(queries: np.ndarray, matches: np.ndarray, path: str | Path, ncol_pairs: int = 8) -> Path:
    """Each query next to its match: columns alternate (query, match). uint8 (N, C, *spatial)."""
    q, m = _u8(queries), _u8(matches)
    inter = np.empty((2 * len(q), *q.shape[1:]), dtype=np.uint8)
    inter[0::2], inter[1::2] = q, m
    return write_png(path, image_grid(inter, ncol=2 * ncol_pairs), scale=3)


def nn_histograms(sets: dict[str, dict[str, np.ndarray]], path: str | Path, ratio_threshold: float,
                  title: str = "") -> Path:
    """Histograms of nearest-neighbour distance and Carlini ratio, one colour per query set."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    colors = {"synthetic": "#3b6ea8", "held_out": "#d08c2c"}
    for ax, key in zip(axes, ("nn_distance", "carlini_ratio")):
        allv = np.concatenate([np.asarray(v[key], float) for v in sets.values()])
        edges = np.linspace(0.0, max(float(allv.max()), 1e-6) * 1.02, 41)  # shared bins: comparable heights
        for name, vals in sets.items():
            v = np.asarray(vals[key], float)
            ax.hist(v, bins=edges, alpha=0.55, density=True, color=colors.get(name), label=f"{name} (n={len(v)})")
    axes[0].set_xlabel("l2 distance to the nearest private training image")
    axes[1].set_xlabel("Carlini ratio d1 / (0.5 mean d(k nearest))")
    axes[1].axvline(ratio_threshold, color="k", ls=":", lw=1, label=f"near-copy threshold {ratio_threshold:.3g}")
    for ax in axes:
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    fig.suptitle(title or "memorization: synthetic vs held-out real (internal)", fontsize=9)
    return _save(fig, Path(path))


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: str | Path,
               limit_eps_delta: tuple[float, float] | None = None, limit_points: dict[float, float] | None = None) -> Path:
    """ROC curves (log-log and linear) with the DP limit curve and the mechanism's limit points.

    curves: name -> (fpr, tpr, auc).
    """
    from dpgen.probes.stats import eps_delta_tpr_limit

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    grid = np.logspace(-4, 0, 200)
    for ax, log in zip(axes, (True, False)):
        for name, (fpr, tpr, a) in curves.items():
            ax.step(fpr, tpr, where="post", label=f"{name} (AUC {a:.3f})")
        if limit_eps_delta is not None:
            eps, delta = limit_eps_delta
            ax.plot(grid, [eps_delta_tpr_limit(f, eps, delta) for f in grid], "k--", lw=1,
                    label=f"(eps={eps:.3g}, delta={delta:g}) limit")
        if limit_points:
            ax.plot(list(limit_points), list(limit_points.values()), "kv", label="limit of the run's DP-SGD (PLD)")
        ax.plot(grid, grid, color="grey", lw=0.8, ls=":")
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(1e-3, 1)
            ax.set_ylim(1e-3, 1.02)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("membership inference (internal: computed on private images)", fontsize=9)
    return _save(fig, Path(path))


def reconstruction_grid(targets, recon_no_noise, recon_noise, path: str | Path) -> Path:
    """Rows: targets, reconstructions without noise, reconstructions with the run's noise."""
    t, a, b = _u8(targets), _u8(recon_no_noise), _u8(recon_noise)
    stack = np.concatenate([t, a, b])
    return write_png(path, image_grid(stack, ncol=len(t)), scale=3)


__all__ = ["pairs_grid", "nn_histograms", "roc_figure", "reconstruction_grid"]
