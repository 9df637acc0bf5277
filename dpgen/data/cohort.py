"""Writing a synthetic cohort: MedMNIST-layout .npz, a PNG grid per class, and (3D) NIfTI.

`CohortWriter` streams: each generated batch goes straight to a .npy memmap on disk (and to
NIfTI files), so a cohort larger than memory can be written; `close()` then writes the final
`cohort.npz` from the memmap in chunks and removes it.
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np

from dpgen.core.naming import class_name
from dpgen.data.medmnist import channel_first_to_medmnist
from dpgen.data.nifti import to_nifti_array, write_nifti
from dpgen.rundir import atomic_path, write_text_atomic


def write_cohort_npz(path: str | Path, images: np.ndarray, labels: np.ndarray, attributes: np.ndarray | None = None,
                     attribute_names: list[str] | None = None) -> Path:
    """`train_images` (MedMNIST layout, uint8) and `train_labels` (N, 1), like the real files,
    so anything that reads MedMNIST reads the cohort."""
    labels = np.asarray(labels)
    arrays = {"train_images": channel_first_to_medmnist(images),
              "train_labels": labels.reshape(-1, 1).astype(np.uint8 if labels.max() < 256 else np.int64)}
    if attributes is not None:
        arrays["train_attributes"] = np.asarray(attributes, dtype=np.float32)
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
    labels = np.asarray(labels)
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)[:per_class]  # index first: never loads a whole class of a memmap
        sel = np.asarray(images[idx])
        name = class_name(int(k), class_names)
        safe = "".join(ch if ch.isalnum() else "_" for ch in name)
        out.append(write_png(Path(folder) / f"grid_class{k}_{safe}.png", image_grid(sel)))
    return out


class CohortWriter:
    """Streams a cohort of `n` images to `folder` batch by batch."""

    def __init__(self, folder: str | Path, n: int, image_shape: tuple[int, ...], attribute_names: list[str] | None = None,
                 nifti: bool = False, class_names: list[str] | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.n, self.image_shape = n, tuple(image_shape)
        self.attribute_names = list(attribute_names or [])
        self.class_names = class_names
        self.nifti = nifti
        self._tmp = self.folder / ".images.partial.npy"
        self.images = np.lib.format.open_memmap(self._tmp, mode="w+", dtype=np.uint8, shape=(n, *self.image_shape))
        self.labels = np.zeros(n, dtype=np.int64)
        self.attributes = np.zeros((n, len(self.attribute_names)), dtype=np.float32) if self.attribute_names else None
        self.written = 0
        self.nifti_dir = self.folder / "nifti"
        if nifti:
            to_nifti_array(np.zeros(self.image_shape, dtype=np.uint8))  # refuses what NIfTI cannot hold
            shutil.rmtree(self.nifti_dir, ignore_errors=True)
            self.nifti_dir.mkdir(parents=True)

    def nifti_name(self, i: int) -> str:
        return f"nifti/synthetic_{i:06d}.nii.gz"

    def write(self, start: int, images: np.ndarray, labels: np.ndarray, attributes: np.ndarray | None = None) -> None:
        b = len(images)
        self.images[start:start + b] = images
        self.labels[start:start + b] = labels
        if self.attributes is not None and attributes is not None:
            self.attributes[start:start + b] = attributes
        if self.nifti:
            for j in range(b):
                write_nifti(self.folder / self.nifti_name(start + j), images[j])
        self.written = max(self.written, start + b)

    def close(self) -> dict:
        if self.written != self.n:
            raise RuntimeError(f"cohort writer got {self.written} of {self.n} images")
        self.images.flush()
        npz = write_cohort_npz(self.folder / "cohort.npz", self.images, self.labels,
                               self.attributes if self.attributes is not None else None, self.attribute_names)
        grids = write_class_grids(self.folder, self.images, self.labels, self.class_names)
        out = {"npz": str(npz), "grids": [str(g) for g in grids], "n": self.n,
               "class_counts": {int(k): int((self.labels == k).sum()) for k in np.unique(self.labels)}}
        if self.nifti:
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(["image", "label", *self.attribute_names])
            for i in range(self.n):
                attrs = [f"{v:.6g}" for v in self.attributes[i]] if self.attributes is not None else []
                w.writerow([self.nifti_name(i), int(self.labels[i]), *attrs])
            write_text_atomic(self.folder / "labels.csv", buf.getvalue())
            out["nifti"] = str(self.nifti_dir)
            out["labels_csv"] = str(self.folder / "labels.csv")
        del self.images
        self._tmp.unlink(missing_ok=True)
        return out
