"""The in-memory dataset every stage works on, and the checks that guard it.

Images are kept as they were read (uint8 for MedMNIST and PNG, float for NIfTI/DICOM) in a
channel-first array (N, C, *spatial). Scaling to the model's range is a fixed, public map
(`to_model_range`), never a statistic of the private data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# torch is imported where tensors are made: reading and checking data needs only numpy.


class DataError(ValueError):
    """A problem with a data file, phrased for the user: the file and what is wrong."""


@dataclass
class ImageDataset:
    images: np.ndarray  # (N, C, H, W) or (N, C, D, H, W)
    labels: np.ndarray  # (N,) int64
    name: str
    path: str
    split: str
    fingerprint: str  # sha256 of the source file(s); the manifest records this, never the data
    subjects: np.ndarray | None = None  # (N,) unit of privacy when present
    attributes: np.ndarray | None = None  # (N, A) float32
    attribute_names: list[str] = field(default_factory=list)
    intensity_range: tuple[float, float] | None = None  # fixed window for float images
    transform: dict | None = None  # what dpgen.data.transform did to fit the images to another shape

    def __post_init__(self) -> None:
        check_arrays(self.images, self.labels, self.path, self.split)
        if self.subjects is not None and len(self.subjects) != len(self.images):
            raise DataError(
                f"{self.path}: {len(self.subjects)} subject IDs for {len(self.images)} images in split {self.split!r}"
            )
        if self.attributes is not None:
            if len(self.attributes) != len(self.images):
                raise DataError(
                    f"{self.path}: {len(self.attributes)} attribute rows for {len(self.images)} images in split {self.split!r}"
                )
            if not np.isfinite(self.attributes).all():
                raise DataError(f"{self.path}: attributes contain NaN or inf in split {self.split!r}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def spatial_dims(self) -> int:
        return self.images.ndim - 2

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def subset(self, n: int | None) -> "ImageDataset":
        if n is None or n >= len(self):
            return self
        return ImageDataset(
            images=self.images[:n], labels=self.labels[:n], name=self.name, path=self.path, split=self.split,
            fingerprint=self.fingerprint + f"[:{n}]",
            subjects=None if self.subjects is None else self.subjects[:n],
            attributes=None if self.attributes is None else self.attributes[:n],
            attribute_names=list(self.attribute_names),
        )

    def model_tensor(self) -> "torch.Tensor":
        return to_model_range(self.images, self.intensity_range)

    def info(self) -> dict:
        return {
            "name": self.name, "path": self.path, "split": self.split, "n": len(self),
            "image_shape": list(self.image_shape), "sha256": self.fingerprint,
            "has_subjects": self.subjects is not None, "attributes": list(self.attribute_names),
            **({"transform": self.transform} if self.transform else {}),
        }


def check_arrays(images: np.ndarray, labels: np.ndarray, path: str, split: str) -> None:
    where = f"{path} (split {split!r})"
    if images.ndim not in (4, 5):
        raise DataError(f"{where}: images have shape {images.shape}; expected (N, C, H, W) or (N, C, D, H, W)")
    if len(images) == 0:
        raise DataError(f"{where}: no images")
    if labels.ndim != 1:
        raise DataError(f"{where}: labels have shape {labels.shape}; expected one integer label per image")
    if len(labels) != len(images):
        raise DataError(f"{where}: {len(labels)} labels for {len(images)} images")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        bad = int((~np.isfinite(images.reshape(len(images), -1))).any(1).sum())
        raise DataError(f"{where}: {bad} image(s) contain NaN or inf")
    if images.dtype.kind not in "uif":
        raise DataError(f"{where}: images have dtype {images.dtype}; expected integers or floats")
    if (labels < 0).any():
        raise DataError(f"{where}: negative labels")


def to_model_range(images: np.ndarray | torch.Tensor, intensity_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Images -> float in [-1, 1], by a map that uses no dataset statistic.

    uint8: [0, 255]. Floats: the user's fixed window `intensity_range`, else each image's own
    min and max (a per-record map). Using private dataset-wide min/max or mean/std here would
    release a statistic of the private data outside DP.
    """
    import torch

    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif intensity_range is not None:
        lo, hi = intensity_range
        x = ((x.float() - lo) / (hi - lo)).clamp(0, 1)
    else:
        flat = x.float().flatten(1)
        lo = flat.min(1, keepdim=True).values
        hi = flat.max(1, keepdim=True).values
        x = ((flat - lo) / (hi - lo).clamp_min(1e-12)).view(x.shape)
    return x * 2 - 1


def from_model_range(x: torch.Tensor) -> np.ndarray:
    """float [-1, 1] -> uint8 [0, 255] (the cohort's storage format)."""
    import torch

    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


