"""Pieces shared by the training loops: EMA, resumable training state (safetensors), logging.

Weights files (what sampling reads) are `dpgen.core.checkpoints`; devices `dpgen.core.device`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dpgen.core.checkpoints import read_metadata
from dpgen.distributed import is_writer
from dpgen.rundir import load_tensors, save_tensors_atomic


class EMA:
    """Exponential moving average of a model's floating-point state (weights the sampler uses)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach(), 1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k in self.shadow:
            self.shadow[k].copy_(state[k])

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict({**model.state_dict(), **self.shadow})


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, json.dumps({"param_groups": sd["param_groups"], "scalars": scalars})


def _unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: str) -> None:
    info = json.loads(meta)
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in info["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})


# A training state is one or more parts (model, EMA, optimizer), each under its own key
# prefix ("" for the main part, e.g. "g." for a GAN's generator), saved in one atomic file so a
# crash can never leave the parts from different steps.
Part = tuple[nn.Module, EMA, torch.optim.Optimizer]


def save_state(path: Path, parts: dict[str, Part], step: int, extra: dict | None = None) -> None:
    """Everything needed to resume a loop exactly, in one atomic safetensors file."""
    tensors, meta = {}, {"step": str(step), "extra": json.dumps(extra or {})}
    for prefix, (model, ema, optimizer) in parts.items():
        tensors.update({f"{prefix}model.{k}": v for k, v in model.state_dict().items()})
        tensors.update({f"{prefix}ema.{k}": v for k, v in ema.state_dict().items()})
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        tensors.update({prefix + k: v for k, v in opt_tensors.items()})
        meta[f"{prefix}optimizer"] = opt_meta
    save_tensors_atomic(path, tensors, metadata=meta)


def load_state(path: Path, parts: dict[str, Part]) -> tuple[int, dict]:
    tensors = load_tensors(path)
    meta = read_metadata(path)
    for prefix, (model, ema, optimizer) in parts.items():
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)} if prefix else tensors
        model.load_state_dict({k[6:]: v for k, v in own.items() if k.startswith("model.")})
        ema.load_state_dict({k[4:]: v for k, v in own.items() if k.startswith("ema.")})
        _unflatten_optimizer(optimizer, own, meta[f"{prefix}optimizer"])
    return int(meta["step"]), json.loads(meta["extra"])


class TBLogger:
    """TensorBoard scalars; a no-op when tensorboard is not importable."""

    def __init__(self, logdir: Path):
        self.writer = None
        if not is_writer():  # distributed fine-tuning: rank 0 logs
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(logdir))
        except Exception:  # pragma: no cover - tensorboard is a dependency, but never fail a run on logs
            self.writer = None

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None and value == value:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
