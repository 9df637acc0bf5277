"""The DP mechanisms dpgen runs on private data: their names, and the small ones themselves.

Every mechanism that touches private data has a constant name here. The ledger records plans,
progress and releases under these names, and an artifact's privacy source names the
mechanisms it depends on; the release refuses a name it does not know. Names are
`"<kind>:<purpose>"`.

Scope: a "release" mechanism's outputs may leave the run directory (the generator, the cohort,
a DP histogram); its cost is composed into the epsilon the card states. An "internal"
mechanism's outputs never leave the run directory's internal/ part (the evaluation's DP
classifiers, whose only outputs are metrics for the data holder's internal review); it is
recorded in the ledger for the record, with its own epsilon, and composed into nothing that
is released.
"""

from __future__ import annotations

import numpy as np
import torch

#: DP-SGD of the generator (the diffusion UNet, the latent UNet, or the cGAN discriminator).
FINETUNE = "dp_sgd:finetune"
#: DP-SGD of the latent-diffusion autoencoder (optional second mechanism of the same run).
AUTOENCODER = "dp_sgd:autoencoder"
#: Gaussian mechanism on the per-unit label fractions (class counts of the cohort).
LABEL_HISTOGRAM = "gaussian:label_histogram"
#: Gaussian mechanism on the per-unit attribute-bin fractions.
ATTRIBUTE_HISTOGRAM = "gaussian:attribute_histogram"
#: The evaluation's DP-SGD classifiers (internal: only their test metrics exist, in internal/).
EVALUATION_BASELINE = "dp_sgd:evaluation_baseline"
EVALUATION_FINETUNE = "dp_sgd:evaluation_finetune"

RELEASE_MECHANISMS = frozenset({FINETUNE, AUTOENCODER, LABEL_HISTOGRAM, ATTRIBUTE_HISTOGRAM})
INTERNAL_MECHANISMS = frozenset({EVALUATION_BASELINE, EVALUATION_FINETUNE})
KNOWN_MECHANISMS = RELEASE_MECHANISMS | INTERNAL_MECHANISMS


def scope_of(mechanism: str) -> str:
    """"release" or "internal"; a name dpgen does not know is an error (fail closed)."""
    if mechanism in RELEASE_MECHANISMS:
        return "release"
    if mechanism in INTERNAL_MECHANISMS:
        return "internal"
    raise ValueError(f"unknown DP mechanism {mechanism!r}; dpgen knows {', '.join(sorted(KNOWN_MECHANISMS))}")


def release_label_histogram(labels: np.ndarray, units, num_classes: int, sigma: float, generator: torch.Generator) -> np.ndarray:
    """Gaussian mechanism on the label histogram, per privacy unit.

    Each unit (image or subject) contributes the vector of its label *fractions*, whose L2
    norm is at most 1, so adding or removing one unit moves the histogram by at most 1 in
    L2: the noise std `sigma` is the noise multiplier. Returns the noisy counts (may be
    negative; clip when turning them into proportions). `generator` must be secret.
    """
    hist = np.zeros(num_classes)
    for rows in units.rows_of_unit:
        hist += np.bincount(labels[rows], minlength=num_classes)[:num_classes] / len(rows)
    noise = torch.randn(num_classes, generator=generator, dtype=torch.float64).numpy() * sigma
    return hist + noise


def release_attribute_histogram(values, units, bins: int, sigma: float, generator: torch.Generator) -> np.ndarray:
    """(A, bins) noisy histograms of attributes normalized to [-1, 1]. Each unit adds the
    fractions of its rows per bin (sum 1 per attribute), so adding or removing a unit moves
    the whole (A x bins) array by at most sqrt(A) in L2; the noise std per bin is `sigma`.
    `generator` must be secret."""
    v = np.asarray(values, dtype=np.float64)
    idx = np.clip(np.floor((v + 1) / 2 * bins), 0, bins - 1).astype(int)  # (N, A)
    hist = np.zeros((v.shape[1], bins))
    for rows in units.rows_of_unit:
        for j in range(v.shape[1]):
            hist[j] += np.bincount(idx[rows, j], minlength=bins) / len(rows)
    noise = torch.randn(hist.shape, generator=generator, dtype=torch.float64).numpy() * sigma
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
