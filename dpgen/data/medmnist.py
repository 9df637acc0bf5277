"""MedMNIST .npz files: find them, download them (with the published md5), read them.

Resolution order for a name such as "breastmnist": $DPGEN_DATA_DIR, then the cache
directory ($DPGEN_CACHE_DIR or ~/.cache/dpgen); if missing there it is downloaded from
MedMNIST's published URL into the cache and checked against the published md5.
"""

from __future__ import annotations

import os
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from dpgen.core.files import md5_file, sha256_file
from dpgen.data.dataset import DataError, ImageDataset

_ZENODO = "https://zenodo.org/records/10519652/files/{name}.npz?download=1"

# Published md5 sums (MedMNIST v3 record). Only names whose md5 we have checked are listed;
# any other .npz can be used by path.
MEDMNIST = {
    "breastmnist": {"md5": "750601b1f35ba3300ea97c75c52ff8f6", "classes": ["malignant", "normal, benign"]},
    "pneumoniamnist": {"md5": "28209eda62fecd6e6a2d98b1501bb15f", "classes": ["normal", "pneumonia"]},
    "retinamnist": {"md5": "bd4c0672f1bba3e3a89f0e4e876791e4", "classes": ["0", "1", "2", "3", "4"]},
    "adrenalmnist3d": {"md5": "bbd3c5a5576322bc4cdfea780653b1ce", "classes": ["normal", "hyperplasia"]},
    "adrenalmnist3d_64": {"md5": "17721accfe9fb005146a47d33bc54b2f", "classes": ["normal", "hyperplasia"]},
}
SPLITS = ("train", "val", "test")


def cache_dir() -> Path:
    return Path(os.environ.get("DPGEN_CACHE_DIR", Path.home() / ".cache" / "dpgen"))


def _offline() -> bool:
    return os.environ.get("DPGEN_OFFLINE", "0") not in ("", "0", "false", "False")


def resolve_medmnist(name: str, download: bool = True) -> Path:
    """Path of the .npz for a MedMNIST name; downloads into the cache when allowed."""
    key = name.lower().removesuffix(".npz")
    places = []
    if os.environ.get("DPGEN_DATA_DIR"):
        places.append(Path(os.environ["DPGEN_DATA_DIR"]))
    places.append(cache_dir())
    for d in places:
        p = d / f"{key}.npz"
        if p.is_file():
            return p
    if key not in MEDMNIST:
        raise DataError(
            f"dataset {name!r} is neither a file nor a known MedMNIST name "
            f"(known: {', '.join(sorted(MEDMNIST))}); looked in {', '.join(str(d) for d in places)}"
        )
    target = cache_dir() / f"{key}.npz"
    if not download or _offline():
        raise DataError(
            f"MedMNIST file {key}.npz not found; put it in $DPGEN_DATA_DIR or {target.parent} "
            f"(download: {_ZENODO.format(name=key)}, md5 {MEDMNIST[key]['md5']})"
        )
    return download_medmnist(key, target)


def download_medmnist(key: str, target: Path) -> Path:
    url = _ZENODO.format(name=key)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    os.close(fd)
    try:
        try:
            urllib.request.urlretrieve(url, tmp)  # noqa: S310 (fixed https URL)
        except OSError as err:
            raise DataError(
                f"MedMNIST file {key}.npz not found locally and the download from {url} failed ({err}); "
                f"put the file in $DPGEN_DATA_DIR or {target.parent}"
            ) from None
        got = md5_file(tmp)
        if got != MEDMNIST[key]["md5"]:
            raise DataError(f"download of {url} has md5 {got}, expected {MEDMNIST[key]['md5']}; not using it")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def _read_npz(path: Path, split: str, images: bool = True) -> tuple[np.ndarray | tuple, np.ndarray]:
    """(images, or only their shape when `images` is False; labels as int64), with the checks
    every reader of a MedMNIST .npz needs. Never unpickles."""
    if split not in SPLITS:
        raise DataError(f"{path}: split {split!r} is not one of {SPLITS}")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a .npz file")
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from None
    if not is_zip:
        raise DataError(
            f"{path}: not a readable .npz file: not a zip archive (a .npz is a zip of .npy arrays, as "
            f"numpy.savez writes it); the file is something else, or corrupt or truncated"
        )
    try:
        with np.load(path, allow_pickle=False) as z:  # never unpickle data files
            keys = set(z.files)
            need = {f"{split}_images", f"{split}_labels"}
            if not need <= keys:
                raise DataError(
                    f"{path}: missing key(s) {sorted(need - keys)}; a MedMNIST .npz has "
                    f"<split>_images and <split>_labels (found: {sorted(keys)})"
                )
            labels = z[f"{split}_labels"]
            imgs = z[f"{split}_images"] if images else _npy_shape(z.zip, f"{split}_images.npy")
            if imgs is None:  # a header we do not parse: read the array
                imgs = z[f"{split}_images"].shape
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        msg = str(err)
        if "pickle" in msg.lower():  # an object array: dpgen never unpickles data files
            msg = "it holds Python objects (pickled), not plain numeric arrays"
        raise DataError(f"{path}: not a readable .npz file (corrupt or truncated?): {msg}") from None
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    elif labels.ndim == 2:
        raise DataError(f"{path}: labels have shape {labels.shape}; multi-label tasks are not supported")
    return imgs, integer_labels(labels, f"{path}: {split}_labels")


def _npy_shape(zf: zipfile.ZipFile, member: str) -> tuple | None:
    """The shape in a .npy header inside the archive, without reading the array."""
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)[0]
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(f)[0]
    return None


def peek_npz(path: str | Path, split: str = "train") -> tuple[tuple[int, ...], np.ndarray]:
    """(channel-first shape of one image, labels) of a split, checked like `load_npz` checks them,
    reading the labels and only the images' header (fast: the CLI calls it before starting a run)."""
    path = Path(path)
    shape, labels = _read_npz(path, split, images=False)
    if len(shape) not in (3, 4) or not shape[0]:
        raise DataError(f"{path}: {split}_images have shape {tuple(shape)}; not a MedMNIST 2D or 3D layout")
    if len(labels) != shape[0]:
        raise DataError(f"{path} (split {split!r}): {len(labels)} labels for {shape[0]} images")
    return medmnist_to_channel_first(np.empty((1, *shape[1:]), dtype=np.uint8), path).shape[1:], labels


def load_npz(path: str | Path, split: str = "train", name: str | None = None) -> ImageDataset:
    """Read one split of a MedMNIST-layout .npz (2D grey, 2D RGB or 3D)."""
    path = Path(path)
    images, labels = _read_npz(path, split)
    images = medmnist_to_channel_first(images, path)
    return ImageDataset(
        images=images, labels=labels.astype(np.int64), name=name or path.stem, path=str(path), split=split,
        fingerprint=sha256_file(path),
    )


def integer_labels(labels: np.ndarray, where: str) -> np.ndarray:
    """Class indices as int64; float labels must be whole numbers (0.0, 1.0), never truncated."""
    labels = np.asarray(labels)
    if labels.dtype.kind in "iub":
        return labels.astype(np.int64)
    if labels.dtype.kind == "f":
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
        if bad.any():
            raise DataError(
                f"{where}: {int(bad.sum())} label(s) are not whole numbers (e.g. {float(labels[bad][0]):g}); labels are "
                f"integer class indices 0..K-1 (bin a continuous value into classes first)"
            )
        return labels.astype(np.int64)
    raise DataError(f"{where}: labels have dtype {labels.dtype}; expected integer class indices")


def medmnist_to_channel_first(images: np.ndarray, path) -> np.ndarray:
    """MedMNIST stores (N,H,W) grey, (N,H,W,3) RGB and (N,D,H,W) 3D; we use channel-first."""
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[-1] in (3, 4) and images.shape[1] not in (3, 4):
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    if images.ndim == 4 and images.shape[1] in (3, 4) and images.shape[-1] not in (3, 4) \
            and images.shape[2] == images.shape[3] != images.shape[1]:
        # (N, 3, H, W): RGB stored channel-first. As a volume it would be 3 slices deep.
        raise DataError(
            f"{path}: each image has shape {images.shape[1:]}: RGB (or RGBA) images stored channel-first? MedMNIST "
            f"layout is channel-last (N, H, W, {images.shape[1]}); save them with images.transpose(0, 2, 3, 1). "
            f"(A 3D volume of depth {images.shape[1]} is not supported either.)"
        )
    if images.ndim == 4:
        return images[:, None]  # 3D volume, one channel
    raise DataError(f"{path}: images have shape {images.shape}; not a MedMNIST 2D or 3D layout")


def channel_first_to_medmnist(images: np.ndarray) -> np.ndarray:
    """Inverse of `medmnist_to_channel_first` for writing cohorts in MedMNIST layout."""
    if images.shape[1] == 1:
        return images[:, 0]
    if images.ndim == 4:
        return np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    return images
