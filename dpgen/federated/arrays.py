"""Named weight arrays on the wire: order, fingerprints, files. No torch, no Flower."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

Weights = dict[str, np.ndarray]


def fingerprint(weights: Weights, names: list[str] | None = None) -> str:
    """sha256 over (name, dtype, shape, bytes) in `names` order: the identity of a global model
    (a site replays a round only for the very same starting weights)."""
    h = hashlib.sha256()
    for name in names if names is not None else list(weights):
        a = np.ascontiguousarray(weights[name])
        h.update(json.dumps([name, str(a.dtype), list(a.shape)]).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def to_list(weights: Weights, names: list[str]) -> list[np.ndarray]:
    missing = [n for n in names if n not in weights]
    if missing:
        raise KeyError(f"weights lack {missing[:3]}")
    return [np.ascontiguousarray(weights[n]) for n in names]


def from_list(arrays: list[np.ndarray], names: list[str]) -> Weights:
    if len(arrays) != len(names):
        raise ValueError(f"{len(arrays)} arrays for {len(names)} names")
    return {n: np.asarray(a) for n, a in zip(names, arrays)}


def save(path: Path, weights: Weights, metadata: dict[str, str] | None = None) -> None:
    """safetensors (atomic): loading never unpickles."""
    import torch

    from dpgen.rundir import save_tensors_atomic

    save_tensors_atomic(path, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}, metadata)


def load(path: Path) -> Weights:
    from dpgen.rundir import load_tensors

    return {k: v.numpy() for k, v in load_tensors(path).items()}
