"""An image folder plus a labels CSV: PNG/JPEG (Pillow), NIfTI (dpgen.data.nifti, one axis
convention with the cohort writer), DICOM (MONAI's reader).

CSV columns: `image` (path relative to the folder), `label` (integer), optional subject ID,
split and attribute columns (names set in the config).
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np

from dpgen.data.dataset import DataError, ImageDataset
from dpgen.data.nifti import is_nifti, read_nifti


def _read_image(path: Path) -> np.ndarray:
    """One image as a channel-first array."""
    name = path.name.lower()
    if not path.exists():
        raise DataError(f"{path}: listed in the labels CSV but does not exist")
    try:
        if is_nifti(name):
            return read_nifti(path)
        if name.endswith(".dcm") or path.is_dir():
            from monai.transforms import LoadImage  # MONAI reads DICOM (pydicom): a file or a series folder

            arr = np.asarray(LoadImage(image_only=True, ensure_channel_first=True)(str(path)))
            return arr.astype(np.float32)
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im)
    except DataError:
        raise
    except Exception as err:  # a decoder's error deep inside PIL/MONAI: say which file
        raise DataError(f"{path}: cannot be read as an image ({type(err).__name__}: {err})") from None
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def _label(text: str, csv_path: Path, row: int, column: str) -> int:
    """A class index from the CSV: "1" or "1.0", never a truncated "1.5"."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        v = None
    if v is None or not v.is_integer():
        raise DataError(f"{csv_path}: row {row}: {column} = {text!r} is not an integer class index (0..K-1)")
    return int(v)


def load_folder(
    root: str | Path,
    labels_csv: str | None = None,
    split: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    subject_column: str | None = None,
    split_column: str | None = None,
    attribute_columns: list[str] | tuple[str, ...] = (),
) -> ImageDataset:
    root = Path(root)
    csv_path = Path(root) if root.is_file() else root / (labels_csv or "labels.csv")
    if csv_path.is_file() and root.is_file():
        root = csv_path.parent
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: labels CSV not found")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DataError(f"{csv_path}: no rows")
    need = [image_column, label_column, *(c for c in [subject_column, split_column] if c), *attribute_columns]
    missing = [c for c in need if c not in rows[0]]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {missing}; found {list(rows[0])}")
    if split_column and split:
        rows = [r for r in rows if r[split_column] == split]
        if not rows:
            raise DataError(f"{csv_path}: no rows with {split_column} == {split!r}")
    images, labels, subjects, attrs = [], [], [], []
    digest = hashlib.sha256(csv_path.read_bytes())
    for i, r in enumerate(rows):
        p = root / r[image_column]
        img = _read_image(p)
        if images and img.shape != images[0].shape:
            raise DataError(
                f"{p}: image of shape {img.shape}, but {root / rows[0][image_column]} has {images[0].shape}; "
                f"all images must have one size (resample them first)"
            )
        images.append(img)
        labels.append(_label(r[label_column], csv_path, i + 2, label_column))
        try:
            attrs.append([float(r[c]) for c in attribute_columns])
        except ValueError as err:
            raise DataError(f"{csv_path}: row {i + 2}: {err}") from None
        if subject_column:
            subjects.append(r[subject_column])
        digest.update(p.read_bytes() if p.is_file() else str(p).encode())
    arr = np.stack(images)
    return ImageDataset(
        images=arr, labels=np.asarray(labels, dtype=np.int64), name=root.name, path=str(csv_path),
        split=split or "all", fingerprint=digest.hexdigest(),
        subjects=np.asarray(subjects) if subject_column else None,
        attributes=np.asarray(attrs, dtype=np.float32) if attribute_columns else None,
        attribute_names=list(attribute_columns),
    )
