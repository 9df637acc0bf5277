"""Writing a synthetic cohort: MedMNIST-layout .npz and a PNG grid per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpgen.data.medmnist import channel_first_to_medmnist
from dpgen.rundir import atomic_path


def write_cohort_npz(path: str | Path, images: np.ndarray, labels: np.ndarray, attributes: np.ndarray | None = None,
                     attribute_names: list[str] | None = None) -> Path:
    """`train_images` (MedMNIST layout, uint8) and `train_labels` (N, 1), like the real files,
    so anything that reads MedMNIST reads the cohort."""
    arrays = {"train_images": channel_first_to_medmnist(images), "train_labels": np.asarray(labels).reshape(-1, 1).astype(np.uint8 if labels.max() < 256 else np.int64)}
    if attributes is not None:
        arrays["train_attributes"] = attributes.astype(np.float32)
        arrays["attribute_names"] = np.asarray(attribute_names or [], dtype=str)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    return Path(path)


def image_grid(images: np.ndarray, ncol: int = 10) -> np.ndarray:
    """(N, C, H, W) uint8 -> one (H', W', C) grid; 3D volumes show their middle slice."""
    if images.ndim == 5:
        images = images[:, :, images.shape[2] // 2]
    n, c, h, w = images.shape
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    grid = np.full((nrow * (h + 2) + 2, ncol * (w + 2) + 2, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + col * (w + 2): 2 + col * (w + 2) + w] = images[i].transpose(1, 2, 0)
    return grid


def write_png(path: str | Path, array: np.ndarray, scale: int = 3) -> Path:
    from PIL import Image

    a = array[..., 0] if array.shape[-1] == 1 else array
    im = Image.fromarray(a)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
    return Path(path)


def write_class_grids(folder: str | Path, images: np.ndarray, labels: np.ndarray, class_names: list[str] | None = None,
                      per_class: int = 50) -> list[Path]:
    out = []
    for k in np.unique(labels):
        sel = images[labels == k][:per_class]
        name = class_names[k] if class_names and k < len(class_names) else str(k)
        safe = "".join(ch if ch.isalnum() else "_" for ch in name)
        out.append(write_png(Path(folder) / f"grid_class{k}_{safe}.png", image_grid(sel)))
    return out
