"""Which torch device a command runs on."""

from __future__ import annotations

import torch


def resolve_device(name: str | None = "auto") -> torch.device:
    """"auto" (or None): CUDA when available, else the CPU. A CUDA device on a machine without
    CUDA is the user's input error (ConfigError), said before any work starts."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from dpgen.config import ConfigError

        raise ConfigError(f"--device {name}: CUDA is not available on this machine (use cpu)")
    return dev


__all__ = ["resolve_device"]
