"""NIfTI files: the one place dpgen reads and writes them, with one axis convention.

The convention: a channel-first array (C, *spatial) is stored with its spatial axes in the same
order as the NIfTI voxel axes (array axis 1 -> i, 2 -> j, 3 -> k); more than one channel goes
on the last NIfTI axis; the affine is the identity (1 mm voxels: the generator knows no voxel
spacing). Reading does the inverse, so any array dpgen writes comes back unchanged, voxel for
voxel. Values are read as float32, like every NIfTI source (a cohort's volumes hold 0..255:
read them with `intensity_range: [0, 255]` for the scaling the cohort's .npz gets).

Reading a NIfTI file dpgen did not write takes its data array as stored (nibabel's voxel
order, no reorientation to a canonical orientation, the same as MONAI's `LoadImage`), so a
private NIfTI set, the model trained on it and the cohort it produces share one orientation.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from dpgen.data.dataset import DataError

SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(SUFFIXES)


def to_nifti_array(image: np.ndarray) -> np.ndarray:
    """Channel-first (C, *spatial) -> the array stored in the file ((*spatial) or (*spatial, C)).

    A 2D image with several channels is refused: stored as (H, W, C) it would read back as a
    one-channel volume (write it as PNG)."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] > 1:
        raise ValueError(f"a {image.shape[0]}-channel 2D image cannot be stored as NIfTI unambiguously (it would read "
                         f"back as a volume); write PNG instead")
    return np.ascontiguousarray(image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1))


def from_nifti_array(data: np.ndarray, spatial_dims: int | None = None) -> np.ndarray:
    """The stored array -> channel-first. `spatial_dims` (2 or 3) says how many leading axes are
    spatial; default: 2D and 3D arrays are one-channel images / volumes, a 4D array is a volume
    with its channels last."""
    data = np.asarray(data)
    if spatial_dims is None:
        spatial_dims = min(data.ndim, 3)
    if data.ndim == spatial_dims:
        return data[None]
    if data.ndim == spatial_dims + 1:
        return np.ascontiguousarray(np.moveaxis(data, -1, 0))
    raise ValueError(f"a NIfTI array of shape {data.shape} is not {spatial_dims}D (+ channels)")


def write_nifti(path: str | Path, image: np.ndarray) -> Path:
    """One channel-first image or volume as .nii.gz (or .nii), identity affine, atomically and
    reproducibly (the gzip header carries no time stamp)."""
    import nibabel as nib

    from dpgen.rundir import atomic_path

    data = nib.Nifti1Image(to_nifti_array(image), np.eye(4)).to_bytes()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            if str(path).lower().endswith(".gz"):
                with gzip.GzipFile(filename="", fileobj=f, mode="wb", mtime=0) as gz:  # no temp name in the header
                    gz.write(data)
            else:
                f.write(data)
    return Path(path)


def read_nifti(path: str | Path) -> np.ndarray:
    """A NIfTI file as a channel-first float32 array."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as err:  # nibabel's errors for corrupt or truncated files
        raise DataError(f"{path}: cannot be read as NIfTI ({type(err).__name__}: {err})") from None
    try:
        return from_nifti_array(data.astype(np.float32))
    except ValueError as err:
        raise DataError(f"{path}: {err}") from None


__all__ = ["SUFFIXES", "is_nifti", "read_nifti", "write_nifti", "to_nifti_array", "from_nifti_array"]
