"""Weights files: safetensors whose metadata holds the generator family and the spec that
rebuilds the network, so one file is self-describing and loading never unpickles.

Building the network a file describes needs the family registry
(`dpgen.models.registry.build_from_checkpoint`); this module only reads and writes files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dpgen.rundir import load_tensors, save_tensors_atomic


def save_weights(path: Path, state: dict[str, torch.Tensor], spec: dict, info: dict | None = None,
                 family: str = "diffusion") -> None:
    """Release-style weights: the tensors, the family, the spec (JSON) and an info record."""
    save_tensors_atomic(path, state, metadata={"family": family, "spec": json.dumps(spec),
                                               "info": json.dumps(info or {})})


def read_metadata(path: Path) -> dict[str, str]:
    """The safetensors metadata of `path` (a clear error when it is not a safetensors file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # not a safetensors file at all
        raise ValueError(f"{path}: not a safetensors checkpoint ({err})") from None


def load_checkpoint(path: Path) -> tuple[str, dict[str, torch.Tensor], dict, dict]:
    """(family, tensors, spec, info) of a weights file written by `save_weights`."""
    meta = read_metadata(path)
    if "spec" not in meta:
        raise ValueError(f"{path}: not a dpgen checkpoint (no model spec in its metadata)")
    return meta.get("family", "diffusion"), load_tensors(path), json.loads(meta["spec"]), json.loads(meta.get("info", "{}"))


__all__ = ["save_weights", "load_checkpoint", "read_metadata"]
