"""Figures of the release review, as PNG bytes (matplotlib, Agg backend; Pillow for image grids).

Every function takes numbers or arrays it is given and never reads private data itself: what goes
into the releasable report is decided in `dpgen.report.html`.
"""

from __future__ import annotations

import io
import math

import numpy as np

from dpgen.plotting import png_bytes as _png
from dpgen.plotting import pyplot as _plt

INF_GAP = 3.0  # how far right of the largest finite epsilon "∞" is drawn (a factor on the log axis)


def grid_png(images: np.ndarray, ncol: int = 8, scale: int = 3) -> bytes:
    """(N, C, H, W) or (N, C, D, H, W) uint8 -> a PNG grid (3D: middle slice)."""
    from PIL import Image

    from dpgen.data.cohort import image_grid

    g = image_grid(np.asarray(images), ncol=ncol)
    im = Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def epsilon_axis(eps: list[float]) -> tuple[list[float], float | None]:
    """x positions on a log axis: finite epsilons as they are, inf at the right end."""
    finite = [e for e in eps if e is not None and math.isfinite(e) and e > 0]
    x_inf = (max(finite) * INF_GAP) if finite else 10.0
    return [x_inf if (e is not None and math.isinf(e)) else e for e in eps], (x_inf if any(
        e is not None and math.isinf(e) for e in eps) else None)


def _label_inf(ax, x_inf: float | None, xs: list[float]) -> None:
    ax.set_xscale("log")
    ticks = []
    for x in sorted({x for x in xs if x is not None and x > 0}):
        if ticks and x / ticks[-1] < 1.15:  # nearly equal epsilons (spent vs target): one tick
            continue
        ticks.append(x)
    if ticks:
        ax.set_xticks(ticks)
        ax.set_xticklabels(["∞" if x_inf is not None and x == x_inf else f"{x:.3g}" for x in ticks])
        ax.minorticks_off()


def privacy_utility_curve(points: list[dict], ceiling: float | None = None, title: str = "") -> bytes:
    """Downstream ROC-AUC and fidelity (FD) vs epsilon.

    points: [{"epsilon", "tstr_auc", "tstr_std", "dp_sgd_auc", "dp_sgd_std", "fd", "fd_real"}, ...]
    (None where missing). The non-private ceiling is a horizontal line; the DP-SGD baseline is
    drawn at each epsilon (it is trained at that epsilon) as a dashed line.
    """
    plt = _plt()
    pts = sorted(points, key=lambda p: (math.inf if p["epsilon"] is None else p["epsilon"]))
    xs, x_inf = epsilon_axis([p["epsilon"] for p in pts])
    has_fd = any(p.get("fd") is not None for p in pts)
    fig, axes = plt.subplots(1, 2 if has_fd else 1, figsize=(10 if has_fd else 5.5, 3.8), squeeze=False)
    ax = axes[0][0]

    def series(key):
        sel = [(x, p.get(key), p.get(key.replace("_auc", "_std"))) for x, p in zip(xs, pts) if p.get(key) is not None]
        return [s[0] for s in sel], [s[1] for s in sel], [s[2] or 0.0 for s in sel]

    x, y, e = series("tstr_auc")
    if x:
        ax.errorbar(x, y, yerr=e, marker="o", color="C0", capsize=3, label="synthetic only (TSTR)")
    x, y, e = series("dp_sgd_auc")
    if x:
        ax.errorbar(x, y, yerr=e, marker="s", ls="--", color="C3", capsize=3, label="DP-SGD on real (baseline)")
    x, y, e = series("ft_auc")
    if x:
        ax.plot(x, y, marker="^", ls=":", color="C2", label="synthetic + DP fine-tune")
    if ceiling is not None:
        ax.axhline(ceiling, color="k", lw=1, label=f"non-private ceiling ({ceiling:.3f})")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="chance")
    _label_inf(ax, x_inf, xs)
    ax.set_xlabel("epsilon (log scale; ∞ = non-private)")
    ax.set_ylabel("ROC-AUC on the real test split")
    ax.set_title("downstream utility vs privacy")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    if has_fd:
        ax2 = axes[0][1]
        sel = [(x, p["fd"]) for x, p in zip(xs, pts) if p.get("fd") is not None]
        ax2.plot([s[0] for s in sel], [s[1] for s in sel], marker="o", color="C1", label="cohort vs real train")
        refs = [p["fd_real"] for p in pts if p.get("fd_real") is not None]
        if refs:
            ax2.axhline(float(np.mean(refs)), color="k", lw=1, label="real vs real (reference)")
        _label_inf(ax2, x_inf, xs)
        ax2.set_xlabel("epsilon (log scale; ∞ = non-private)")
        ax2.set_ylabel(pts[0].get("fd_name") or "FD")
        ax2.set_title("fidelity vs privacy (lower is better)")
        ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def epsilon_over_steps(progress: list[tuple[int, float]], target: float | None) -> bytes:
    """Spent epsilon (PLD) at each ledger checkpoint."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    if progress:
        s, e = zip(*progress)
        ax.plot(s, e, marker="o", label="spent (ledger, PLD)")
    if target is not None and math.isfinite(target):
        ax.axhline(target, color="C3", ls="--", label=f"target {target:g}")
    ax.set_xlabel("DP-SGD steps")
    ax.set_ylabel("epsilon")
    ax.set_title("privacy spent during fine-tuning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def bound_vs_prior(events: list[dict], kappa: float, tight: float | None, neighbouring: str = "add_remove") -> bytes:
    """Reconstruction-success bound of the composed mechanisms vs the attacker's prior kappa
    (certified PLD bound at a grid of priors, coarse tolerance), the ledger's point marked."""
    from dpgen.privacy.bounds import rero_bound_events

    plt = _plt()
    ks = np.logspace(-5, -0.05, 14)
    bs = [rero_bound_events(events, float(k), rtol=0.05, neighbouring=neighbouring)["bound"] for k in ks]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(ks, bs, label="bound (all released mechanisms, PLD)")
    ax.plot(ks, ks, color="grey", ls=":", label="prior (no information)")
    if tight is not None:
        ax.plot([kappa], [tight], "o", color="C3", label=f"at κ=1/N: {tight:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("attacker's prior success κ")
    ax.set_ylabel("P[reconstruction] ≤")
    ax.set_title("reconstruction robustness")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


__all__ = ["grid_png", "privacy_utility_curve", "epsilon_over_steps", "bound_vs_prior", "epsilon_axis"]
