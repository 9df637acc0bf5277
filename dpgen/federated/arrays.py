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


def flatten(weights: Weights, names: list[str]) -> np.ndarray:
    """One float32 vector (the wire format: Flower moves every array as its own object, and a
    round of ~150 small tensors cost ~150 round trips per hop)."""
    if not names:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([np.asarray(weights[n], dtype=np.float32).ravel() for n in names])


def unflatten(vector: np.ndarray, names: list[str], shapes: dict[str, list[int]]) -> Weights:
    sizes = [int(np.prod(shapes[n])) for n in names]
    if int(vector.size) != sum(sizes):
        raise ValueError(f"a vector of {vector.size} values for tensors of {sum(sizes)}")
    out, at = {}, 0
    for n, k in zip(names, sizes):
        out[n] = np.asarray(vector[at:at + k], dtype=np.float32).reshape(shapes[n])
        at += k
    return out


def save(path: Path, weights: Weights, metadata: dict[str, str] | None = None) -> None:
    """safetensors (atomic): loading never unpickles."""
    import torch

    from dpgen.rundir import save_tensors_atomic

    save_tensors_atomic(path, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}, metadata)


def load(path: Path) -> Weights:
    from dpgen.rundir import load_tensors

    return {k: v.numpy() for k, v in load_tensors(path).items()}
