"""Pieces shared by the training loops: EMA, checkpoints (safetensors), logging, devices."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dpgen.distributed import is_writer
from dpgen.rundir import load_tensors, save_tensors_atomic


def resolve_device(name: str | None = "auto") -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from dpgen.config import ConfigError

        raise ConfigError(f"--device {name}: CUDA is not available on this machine (use cpu)")
    return dev


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
    from safetensors import safe_open

    tensors = load_tensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    for prefix, (model, ema, optimizer) in parts.items():
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)} if prefix else tensors
        model.load_state_dict({k[6:]: v for k, v in own.items() if k.startswith("model.")})
        ema.load_state_dict({k[4:]: v for k, v in own.items() if k.startswith("ema.")})
        _unflatten_optimizer(optimizer, own, meta[f"{prefix}optimizer"])
    return int(meta["step"]), json.loads(meta["extra"])


def state_extra(path: Path) -> dict:
    """The `extra` a state file was saved with (read from its metadata, no tensor loaded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("extra") or "{}")


def save_training_state(
    path: Path, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer, step: int, extra: dict | None = None
) -> None:
    save_state(path, {"": (model, ema, optimizer)}, step, extra)


def load_training_state(path: Path, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    return load_state(path, {"": (model, ema, optimizer)})


def save_weights(path: Path, state: dict[str, torch.Tensor], spec: dict, info: dict | None = None,
                 family: str = "diffusion") -> None:
    """Release-style weights: safetensors + the generator family and the spec that rebuilds
    the network (JSON in the file's metadata, so one file is self-describing and loading
    never unpickles)."""
    save_tensors_atomic(path, state, metadata={"family": family, "spec": json.dumps(spec),
                                               "info": json.dumps(info or {})})


def load_checkpoint(path: Path) -> tuple[str, dict[str, torch.Tensor], dict, dict]:
    """(family, tensors, spec, info) of a weights file written by `save_weights`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # not a safetensors file at all
        raise ValueError(f"{path}: not a safetensors checkpoint ({err})") from None
    if "spec" not in meta:
        raise ValueError(f"{path}: not a dpgen checkpoint (no model spec in its metadata)")
    return meta.get("family", "diffusion"), load_tensors(path), json.loads(meta["spec"]), json.loads(meta.get("info", "{}"))


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    _, tensors, spec, info = load_checkpoint(path)
    return tensors, spec, info


def build_from_checkpoint(path: Path, family: str | None = None):
    """Rebuild the model a weights file describes and load its tensors (never unpickles)."""
    from dpgen.models import build_model, spec_from_dict

    fam, tensors, spec_dict, info = load_checkpoint(path)
    if family is not None and fam != family:
        raise ValueError(f"{path} holds a {fam!r} model, expected {family!r}")
    spec = spec_from_dict(fam, spec_dict)
    model = build_model(fam, spec)
    model.load_state_dict(tensors)
    return fam, model, spec, info


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
