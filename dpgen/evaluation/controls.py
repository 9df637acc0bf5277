"""Controls that a fidelity feature space must tell apart from real images (issue 13).

A cohort of blurred speckle without lesions once scored FD[public-encoder] 0.63 against 0.23
real-vs-real with precision/recall 0.94/0.97: the metric did not see what an eye sees. These
controls are made from held-out real images and must score clearly worse than the real images
themselves in a feature space that is to judge a cohort (benchmarks/fidelity_controls.py prints
the table for each space; tests/test_evaluation.py holds the real-classifier space to it):

- blurred: a Gaussian blur of `sigma` pixels (the cohort's sharpness is `sharpness`);
- lesion masked: the central disk (where BreastMNIST's crops put the lesion) replaced by a
  heavy blur of itself, so mean intensity and speckle level stay and the structure goes;
- one class: the images of one class only;
- classes swapped: every image under the other class's label (judged per class).
"""

from __future__ import annotations

import numpy as np
import torch

BLUR_SIGMAS = (0.7, 1.0, 1.5)


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """uint8 (N, C, H, W) -> blurred uint8 (separable Gaussian, reflect padding)."""
    x = torch.as_tensor(images).float()
    r = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    n, c, h, w = x.shape
    y = x.reshape(n * c, 1, h, w)
    y = torch.nn.functional.pad(y, (r, r, 0, 0), mode="reflect")
    y = torch.nn.functional.conv2d(y, k.view(1, 1, 1, -1))
    y = torch.nn.functional.pad(y, (0, 0, r, r), mode="reflect")
    y = torch.nn.functional.conv2d(y, k.view(1, 1, -1, 1))
    return y.reshape(n, c, h, w).round().clamp(0, 255).to(torch.uint8).numpy()


def mask_centre(images: np.ndarray, radius_frac: float = 0.25, sigma: float = 4.0) -> np.ndarray:
    h, w = images.shape[-2:]
    yy, xx = np.mgrid[:h, :w]
    disk = (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 <= (radius_frac * h) ** 2
    out = images.copy()
    out[..., disk] = gaussian_blur(images, sigma)[..., disk]
    return out


def sharpness(images: np.ndarray) -> float:
    """Mean squared 4-neighbour Laplacian of images in [0, 1]."""
    x = torch.as_tensor(images).float() / 255.0
    lap = (x[..., 1:-1, :-2] + x[..., 1:-1, 2:] + x[..., :-2, 1:-1] + x[..., 2:, 1:-1] - 4 * x[..., 1:-1, 1:-1])
    return float((lap ** 2).mean())


def control_sets(images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{name: (images, labels)} of every control built from real uint8 2D images."""
    sets = {f"blurred sigma {s}": (gaussian_blur(images, s), labels) for s in BLUR_SIGMAS}
    sets["lesion masked (central disk)"] = (mask_centre(images), labels)
    for c, name in enumerate(class_names):
        sel = labels == c
        sets[f"one class: {name} only"] = (images[sel], labels[sel])
    # Real images under the other class's label: per-class fidelity must see a cohort whose
    # classes look alike (the quickstart cohort's failure), even when every image is real.
    sets["classes swapped (per class)"] = (images, (labels + 1) % len(class_names))
    return sets


__all__ = ["BLUR_SIGMAS", "gaussian_blur", "mask_centre", "sharpness", "control_sets"]
