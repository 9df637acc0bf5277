"""Data sources (MedMNIST .npz, image folder + CSV, NIfTI/DICOM) and cohort writers."""

from __future__ import annotations

from pathlib import Path

from dpgen.data.dataset import DataError, ImageDataset, from_model_range, to_model_range
from dpgen.data.folder import load_folder
from dpgen.data.medmnist import MEDMNIST, load_npz, peek_npz, resolve_medmnist

__all__ = [
    "DataError", "ImageDataset", "load_dataset", "resolve_source", "to_model_range", "from_model_range",
    "load_npz", "load_folder", "MEDMNIST", "check_sources", "check_spatial_dims", "check_labels",
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


def check_sources(data) -> None:
    """Before a run starts (and before torch is loaded): every source of a `DataConfig` resolves,
    and each .npz source is readable, labelled with class indices and of the dimensionality the
    config is for. Errors name the config key. Folder sources are checked when they are read."""
    from dpgen.config import ConfigError

    for role in ("public", "private"):
        spec = getattr(data, role)
        if spec is None:
            continue
        try:
            path = resolve_source(spec.source)
        except DataError as err:
            raise ConfigError(f"config error: data.{role}.source = {spec.source!r}: {err}") from None
        if path.is_file() and path.suffix == ".npz":
            shape, labels = peek_npz(path, spec.split)
            check_spatial_dims(data, role, shape)
            if role == "private":
                check_labels(data, labels[: spec.max_images])


def check_spatial_dims(data, role: str, shape: tuple[int, ...]) -> None:
    """The data's dimensionality is the one the config is for (`data.spatial_dims`): a 2D config
    given 3D volumes would otherwise build a 3D pixel-space model without a word."""
    from dpgen.config import ConfigError

    want, got = data.spatial_dims, len(shape) - 1
    if got == want:
        return
    what = {2: "2D images", 3: "3D volumes"}
    fix = ("set data.spatial_dims: 3 and size the model for volumes (see configs/adrenal3d_quick.yaml)"
           if got == 3 else "set data.spatial_dims: 2 (see configs/quickstart.yaml)")
    raise ConfigError(
        f"config error: data.{role}.source = {getattr(data, role).source!r} holds {what.get(got, f'{got}D data')} "
        f"of shape {'x'.join(map(str, shape))}, but this config is for {what[want]} (data.spatial_dims = {want}); "
        f"use a dataset of the right kind, or {fix}"
    )


def check_labels(data, labels) -> None:
    """Private labels are class indices 0..data.num_classes-1: label K would be read as the
    model's "no label" token (num_classes is its null class), a larger one would crash training."""
    import numpy as np

    from dpgen.config import ConfigError

    labels = np.asarray(labels)
    k = data.num_classes
    if len(labels) and (labels.min() < 0 or labels.max() >= k):
        raise ConfigError(
            f"config error: data.private.source = {data.private.source!r} has labels outside 0..{k - 1} "
            f"(data.num_classes = {k}); set data.num_classes to the private label space"
        )
