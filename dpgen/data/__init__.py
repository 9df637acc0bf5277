"""Data sources (MedMNIST .npz, image folder + CSV, NIfTI/DICOM) and cohort writers."""

from __future__ import annotations

from pathlib import Path

from dpgen.data.dataset import DataError, ImageDataset, from_model_range, to_model_range
from dpgen.data.folder import load_folder
from dpgen.data.medmnist import MEDMNIST, load_npz, resolve_medmnist

__all__ = [
    "DataError", "ImageDataset", "load_dataset", "resolve_source", "to_model_range", "from_model_range",
    "load_npz", "load_folder", "MEDMNIST",
]


def resolve_source(source: str, download: bool = True) -> Path:
    """A path as given, or a MedMNIST name resolved in $DPGEN_DATA_DIR / the cache."""
    p = Path(source).expanduser()
    if p.exists():
        return p
    if p.suffix or "/" in source:
        raise DataError(f"{source}: no such file or folder")
    return resolve_medmnist(source, download=download)


def load_dataset(spec, split: str | None = None, download: bool = True) -> ImageDataset:
    """Load a `DataSource` config section (or anything with the same attributes)."""
    split = split or spec.split
    path = resolve_source(spec.source, download=download)
    if path.is_file() and path.suffix == ".npz":
        ds = load_npz(path, split=split, name=Path(spec.source).stem)
        if spec.subject_column or spec.attribute_columns:
            raise DataError(f"{path}: .npz sources carry no subject or attribute columns; use a folder + CSV")
    else:
        ds = load_folder(
            path, labels_csv=spec.labels_csv, split=split if spec.split_column else None,
            image_column=spec.image_column, label_column=spec.label_column, subject_column=spec.subject_column,
            split_column=spec.split_column, attribute_columns=spec.attribute_columns,
        )
    ds = ds.subset(spec.max_images)
    ds.intensity_range = tuple(spec.intensity_range) if spec.intensity_range else None
    return ds
