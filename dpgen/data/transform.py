"""Fitting public images to the private images' shape (`data.public.transform`).

Public data rarely has the private set's size or channels (a grey public X-ray set for an RGB
private set, 28x28 public images for 64x64 private ones). These fixed maps make them match:

- channels: grey -> RGB repeats the grey channel; RGB (or RGBA, alpha dropped) -> grey is the
  ITU-R BT.601 luminance 0.299 R + 0.587 G + 0.114 B;
- size: MONAI's `Resize` to the private spatial size, 2D or 3D; "auto" interpolation averages
  over areas when shrinking (no aliasing) and interpolates (bi/trilinear) when enlarging.

The private data contributes only its shape, which is schema (it sizes the model); no statistic
of its content is used, and the private data is never transformed. uint8 images stay uint8
(rounded), so they keep the /255 scaling to the model's range; float images stay float32.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dpgen.data.dataset import DataError, ImageDataset

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def convert_channels(images: np.ndarray, channels: int, where: str = "") -> np.ndarray:
    """(N, C, *spatial) -> (N, channels, *spatial)."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1:
        return np.repeat(images, channels, axis=1)
    if channels == 1 and c in (3, 4):
        w = np.asarray(LUMA, dtype=np.float32).reshape((1, 3) + (1,) * (images.ndim - 2))
        grey = (images[:, :3].astype(np.float32) * w).sum(1, keepdims=True)
        return _like(grey, images.dtype)
    raise DataError(f"{where}cannot convert {c}-channel images to {channels} channels (grey <-> RGB only)")


def resize(images: np.ndarray, spatial: tuple[int, ...], interpolation: str = "auto") -> np.ndarray:
    """(N, C, *spatial_in) -> (N, C, *spatial) with MONAI's Resize (each channel of each image alike)."""
    from monai.transforms import Resize

    n, c = images.shape[:2]
    dims = len(spatial)
    if interpolation == "auto":
        interpolation = "area" if all(o <= i for o, i in zip(spatial, images.shape[2:])) else "linear"
    mode = {"linear": "bilinear" if dims == 2 else "trilinear", "area": "area", "nearest": "nearest"}[interpolation]
    x = images.reshape(n * c, *images.shape[2:]).astype(np.float32)  # every channel of every image: one call
    out = np.asarray(Resize(spatial_size=tuple(spatial), mode=mode)(x))
    return _like(out.reshape(n, c, *spatial), images.dtype)


def _like(x: np.ndarray, dtype) -> np.ndarray:
    if dtype == np.uint8:
        return np.clip(np.round(x), 0, 255).astype(np.uint8)
    return x.astype(np.float32)


def fit_to_shape(ds: ImageDataset, shape: tuple[int, ...], transform) -> ImageDataset:
    """`ds` with its images fitted to `shape` (C, *spatial) as `transform` allows (a
    config.PublicTransform: `channels`, `resize`, `interpolation`); what was done is in
    `ds.transform` (and so in `ds.info()`, the manifest's record). Anything the transform does
    not allow is left as it is (the trainer's shape check then names the key to set)."""
    shape = tuple(int(s) for s in shape)
    if transform is None or tuple(ds.image_shape) == shape:
        return ds
    if ds.spatial_dims != len(shape) - 1:
        raise DataError(f"{ds.path}: {ds.spatial_dims}D images cannot be fitted to {len(shape) - 1}D data of shape {shape}")
    images, done = ds.images, []
    if transform.channels and images.shape[1] != shape[0]:
        kind = "replicated" if images.shape[1] == 1 else "luminance (ITU-R BT.601)"
        images = convert_channels(images, shape[0], f"{ds.path}: ")
        done.append(f"channels {ds.image_shape[0]} -> {shape[0]} ({kind})")
    if transform.resize and tuple(images.shape[2:]) != shape[1:]:
        images = resize(images, shape[1:], transform.interpolation)
        done.append(f"size {'x'.join(map(str, ds.image_shape[1:]))} -> {'x'.join(map(str, shape[1:]))} "
                    f"(MONAI Resize, {transform.interpolation} interpolation)")
    if not done:
        return ds
    record = {"from": list(ds.image_shape), "to": list(images.shape[1:]), "steps": done,
              "settings": transform.model_dump()}
    return dataclasses.replace(ds, images=np.ascontiguousarray(images), transform=record)


__all__ = ["fit_to_shape", "convert_channels", "resize", "LUMA"]
