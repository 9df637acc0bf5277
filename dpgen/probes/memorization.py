"""Memorization: how close does each synthetic image come to a private training image?

For every query image (synthetic, or held-out real for the reference) against the private
training set, in pixel space and in the feature space of the evaluation encoder:

- nearest neighbour: index and l2 distance (pixel space: images scaled to [0, 1]);
- Carlini ratio (Carlini et al. 2023, "Extracting Training Data from Diffusion Models", §5):
      ratio(x) = d(x, nn_1) / (alpha * mean_{y in S_k(x)} d(x, y)),
  S_k(x) the k nearest training images, alpha = 0.5, k = 50 (the paper's values; k is capped
  at the training set size). A near-copy is ratio < 1/3: the nearest training image is closer
  than a sixth of the mean distance to the 50 nearest. The threshold is dpgen's documented
  choice (the paper ranks candidates by this ratio and inspects them); it is not tuned on data;
- maximum Pearson correlation to any training image (Akbar et al. 2024, "Beware of diffusion
  models for synthesizing medical images"), with a count above 0.95 (dpgen's choice).

The held-out reference answers "what does an independent real sample look like": the same
statistics for private validation images (never trained on) against the same training set.
The verdict is relative to it: memorization is flagged when the synthetic near-copy fraction
exceeds the held-out fraction (one-sided Fisher exact test, p < 0.01), not at any fixed count.
This matters for real data: BreastMNIST (from BUSI) holds near-duplicate images across its
splits (about a quarter of its validation images have a training image at ratio < 1/3,
pixel-identical up to a grey level or two), so an absolute count would flag real data too.

Cost: two (N_q x D) @ (D x N_t) matrix products per chunk of queries (distances through
|a|^2 + |b|^2 - 2ab, correlations of centred unit vectors), `torch.topk` for the k nearest, and
an exact recomputation of the nearest distance (the Gram form loses precision near 0). 10^4 x
10^4 28x28 images: see benchmarks/probe_speed.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dpgen.probes.stats import one_sided_excess_p, wilson_interval

ALPHA = 0.5
K_NEAREST = 50
RATIO_THRESHOLD = 1 / 3
CORR_THRESHOLD = 0.95
EXCESS_P = 0.01


@dataclass
class Neighbours:
    """Per-query results (all on CPU). `max_corr`/`corr_index` are None when not computed."""

    nn_index: torch.Tensor  # (N_q,) int64
    nn_dist: torch.Tensor  # (N_q,) float64, exact
    ratio: torch.Tensor  # (N_q,) float64
    max_corr: torch.Tensor | None = None
    corr_index: torch.Tensor | None = None
    k: int = K_NEAREST


def flat_unit_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, ...) -> float32 (N, D) in [0, 1] (floats are taken as already in [0, 1])."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return x.reshape(len(x), -1)


@torch.no_grad()
def nearest_neighbours(queries: torch.Tensor, train: torch.Tensor, k: int = K_NEAREST, alpha: float = ALPHA,
                       correlation: bool = True, chunk: int = 1024, device: str | torch.device = "cpu") -> Neighbours:
    """Nearest training rows of every query row (both (N, D) float), in chunks of queries.

    Memory: one (chunk x N_t) block at a time, so 10^4 x 10^5 pairs fit as easily as 10^4 x 10^4.
    """
    device = torch.device(device)
    q_all = queries.float()
    t = train.float().to(device)
    dim = t.shape[1]
    k = max(1, min(k, len(t)))
    t_sq = t.pow(2).sum(1)
    # Correlations come from the same Gram matrix: <a - mean a, b - mean b> = <a, b> - D mean(a) mean(b).
    t_mean = t.mean(1)
    t_cnorm = (t_sq - dim * t_mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-6)
    idx_out, d_out, ratio_out, corr_out, cidx_out = [], [], [], [], []
    for s in range(0, len(q_all), chunk):
        q = q_all[s:s + chunk].to(device)
        gram = q @ t.T
        q_sq = q.pow(2).sum(1)
        if correlation:
            q_mean = q.mean(1)
            q_cnorm = (q_sq - dim * q_mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-6)
            corr = (gram - dim * q_mean[:, None] * t_mean[None]) / (q_cnorm[:, None] * t_cnorm[None])
            c, ci = corr.max(1)
            corr_out.append(c.clamp(-1, 1).double().cpu())
            cidx_out.append(ci.cpu())
            del corr
        d2 = gram.mul_(-2.0).add_(q_sq[:, None]).add_(t_sq[None]).clamp_min_(0)
        vals, idx = torch.topk(d2, k, dim=1, largest=False, sorted=True)
        near = idx[:, 0]
        d1 = (q.double() - t[near].double()).norm(dim=1)  # exact, where the Gram form is least precise
        mean_k = torch.maximum(vals.double().sqrt().mean(1), d1)  # rounding can put d1 above its estimate
        idx_out.append(near.cpu())
        d_out.append(d1.cpu())
        ratio_out.append((d1 / (alpha * mean_k).clamp_min(1e-12)).cpu())
        del d2, gram
    return Neighbours(
        nn_index=torch.cat(idx_out), nn_dist=torch.cat(d_out), ratio=torch.cat(ratio_out),
        max_corr=torch.cat(corr_out) if correlation else None, corr_index=torch.cat(cidx_out) if correlation else None,
        k=k,
    )


def _quantiles(x: torch.Tensor) -> dict:
    a = x.double().numpy()
    q = np.quantile(a, [0.05, 0.25, 0.5, 0.75]) if len(a) else [float("nan")] * 4
    return {"mean": float(a.mean()) if len(a) else float("nan"), "q05": float(q[0]), "q25": float(q[1]),
            "median": float(q[2]), "q75": float(q[3])}


def summarize(nb: Neighbours, ratio_threshold: float = RATIO_THRESHOLD, corr_threshold: float = CORR_THRESHOLD) -> dict:
    """Aggregate statistics of one query set (no per-image values)."""
    n = len(nb.ratio)
    near = int((nb.ratio < ratio_threshold).sum())
    out = {
        "n": n, "k": nb.k,
        "nn_distance": _quantiles(nb.nn_dist),
        "carlini_ratio": _quantiles(nb.ratio),
        "near_copies": near, "near_copy_fraction": near / max(n, 1), "near_copy_fraction_ci": wilson_interval(near, n),
    }
    if nb.max_corr is not None:
        hc = int((nb.max_corr > corr_threshold).sum())
        out["max_correlation"] = _quantiles(nb.max_corr)
        out["high_correlation"] = hc
        out["high_correlation_fraction"] = hc / max(n, 1)
        out["high_correlation_fraction_ci"] = wilson_interval(hc, n)
    return out


def compare(synthetic: dict, reference: dict, excess_p: float = EXCESS_P) -> dict:
    """Is the synthetic near-copy fraction above the held-out reference's? (one-sided Fisher)."""
    out = {}
    for key, frac in (("near_copies", "near_copy_fraction"), ("high_correlation", "high_correlation_fraction")):
        if key not in synthetic or key not in reference:
            continue
        p = one_sided_excess_p(synthetic[key], synthetic["n"], reference[key], reference["n"])
        out[key] = {"synthetic_fraction": synthetic[frac], "reference_fraction": reference[frac],
                    "excess": synthetic[frac] - reference[frac], "p_value_excess": p, "flagged": bool(p < excess_p)}
    return out


def memorization_probe(synthetic: np.ndarray, train: np.ndarray, reference: np.ndarray | None,
                       extractor=None, device: str | torch.device = "cpu", progress: bool = False,
                       k: int = K_NEAREST, ratio_threshold: float = RATIO_THRESHOLD,
                       corr_threshold: float = CORR_THRESHOLD) -> tuple[dict, dict]:
    """Pixel- and feature-space statistics of `synthetic` (and `reference`) against `train`.

    Images are uint8 (N, C, *spatial). Returns (aggregate results, per-image arrays); the
    per-image arrays show private records and belong in the run's internal part only.
    """
    spaces: dict[str, tuple] = {"pixel": (flat_unit_range(synthetic), flat_unit_range(train),
                                          None if reference is None else flat_unit_range(reference))}
    if extractor is not None:
        from dpgen.evaluation.features import extract_features

        feats = [None if a is None else extract_features(extractor, a, device=device, progress=progress, desc=f"features ({name})")
                 for name, a in (("synthetic", synthetic), ("train", train), ("held-out", reference))]
        spaces[f"feature[{extractor.name}]"] = tuple(feats)
    result: dict = {
        "criteria": {
            "distance": "l2; pixel space on images scaled to [0, 1]; feature space on the encoder's features",
            "carlini_ratio": f"d(x, nn1) / ({ALPHA} * mean d(x, k nearest)), k = {k} (capped at the training set size); "
                             f"near-copy if < {ratio_threshold:.4g} (Carlini et al. 2023, section 5; threshold: dpgen's choice)",
            "max_correlation": f"max Pearson correlation to any training image (pixel space; Akbar et al. 2024); "
                               f"counted above {corr_threshold} (dpgen's choice)",
            "verdict": f"flagged when the synthetic fraction exceeds the held-out reference's (one-sided Fisher exact "
                       f"test, p < {EXCESS_P})",
        },
        "n_train": len(train), "spaces": {},
    }
    per_image: dict = {}
    for space, (syn, tr, ref) in spaces.items():
        corr = space == "pixel"
        nb_s = nearest_neighbours(syn, tr, k=k, correlation=corr, device=device)
        entry = {"synthetic": summarize(nb_s, ratio_threshold, corr_threshold)}
        per_image[space] = {"synthetic": nb_s}
        if ref is not None:
            nb_r = nearest_neighbours(ref, tr, k=k, correlation=corr, device=device)
            entry["held_out"] = summarize(nb_r, ratio_threshold, corr_threshold)
            entry["comparison"] = compare(entry["synthetic"], entry["held_out"])
            per_image[space]["held_out"] = nb_r
        result["spaces"][space] = entry
    flags = [c["flagged"] for e in result["spaces"].values() for c in e.get("comparison", {}).values()]
    result["flagged"] = any(flags) if flags else None
    result["verdict"] = ("no reference: verdict needs a held-out split" if not flags else
                         "MEMORIZATION: more near-copies of training images than an independent real sample shows"
                         if any(flags) else "no more near-copies than an independent real sample (held-out reference) shows")
    return result, per_image


def per_image_table(per_image: dict) -> dict:
    """Per-image arrays as JSON-able lists (internal only: they index private records)."""
    out = {}
    for space, sets in per_image.items():
        out[space] = {}
        for name, nb in sets.items():
            row = {"nn_index": nb.nn_index.tolist(), "nn_distance": [round(float(v), 6) for v in nb.nn_dist],
                   "carlini_ratio": [round(float(v), 6) for v in nb.ratio]}
            if nb.max_corr is not None:
                row["max_correlation"] = [round(float(v), 6) for v in nb.max_corr]
                row["max_correlation_index"] = nb.corr_index.tolist()
            out[space][name] = row
    return out


__all__ = ["ALPHA", "K_NEAREST", "RATIO_THRESHOLD", "CORR_THRESHOLD", "Neighbours", "nearest_neighbours",
           "summarize", "compare", "memorization_probe", "per_image_table", "flat_unit_range"]
