"""Small DP mechanisms for statistics released beside the model."""

from __future__ import annotations

import numpy as np
import torch


def release_label_histogram(labels: np.ndarray, units, num_classes: int, sigma: float, generator: torch.Generator) -> np.ndarray:
    """Gaussian mechanism on the label histogram, per privacy unit.

    Each unit (image or subject) contributes the vector of its label *fractions*, whose L2
    norm is at most 1, so adding or removing one unit moves the histogram by at most 1 in
    L2: the noise std `sigma` is the noise multiplier. Returns the noisy counts (may be
    negative; clip when turning them into proportions).
    """
    hist = np.zeros(num_classes)
    for rows in units.rows_of_unit:
        hist += np.bincount(labels[rows], minlength=num_classes)[:num_classes] / len(rows)
    noise = torch.randn(num_classes, generator=generator, dtype=torch.float64).numpy() * sigma
    return hist + noise


def counts_from_histogram(noisy: np.ndarray, total: int) -> dict[int, int]:
    """Post-processing: proportions from a noisy histogram, rounded to sum to `total`."""
    h = np.clip(np.asarray(noisy, dtype=float), 0, None)
    p = h / h.sum() if h.sum() > 0 else np.full(len(h), 1 / len(h))
    return split_total(p, total)


def split_total(p: np.ndarray, total: int) -> dict[int, int]:
    """Largest-remainder rounding of total * p."""
    raw = np.asarray(p) * total
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts))[: total - counts.sum()]:
        counts[i] += 1
    return {i: int(c) for i, c in enumerate(counts)}
