"""Low-rank adapters (LoRA) on nn.Linear layers, written so that Opacus needs nothing new.

A `LoRALinear` keeps the pretrained layer frozen and adds `up(down(x)) * alpha / rank`, where
`down` and `up` are plain nn.Linear modules (no bias): Opacus has exact per-sample gradient
samplers for nn.Linear, so DP-SGD trains the adapters with its ordinary hooks (the preflight
checks it). `up` starts at zero, so an adapted model starts equal to the pretrained one.
After training, `merge_lora` folds the adapters into the base weights and restores the
original architecture: the released checkpoint loads like any other.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
        nn.init.zeros_(self.up.weight)
        self.down.to(base.weight.device, base.weight.dtype)
        self.up.to(base.weight.device, base.weight.dtype)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x)) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        self.base.weight += (self.up.weight @ self.down.weight) * self.scale
        return self.base


def _matches(name: str, patterns: list[str]) -> str | None:
    leaf = name.rsplit(".", 1)[-1]
    for pat in patterns:
        if fnmatch.fnmatchcase(leaf, pat) or fnmatch.fnmatchcase(name, pat):
            return pat
    return None


def add_lora(model: nn.Module, targets: list[str], rank: int, alpha: float | None = None) -> list[str]:
    """Wrap every nn.Linear whose name (last component or full dotted path, glob patterns
    allowed) matches `targets`; freeze everything else. Returns the wrapped layer names.

    Raises ValueError naming the patterns that matched no nn.Linear layer.
    """
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    for p in model.parameters():
        p.requires_grad_(False)
    found: list[tuple[nn.Module, str, str, nn.Linear]] = []
    used = set()
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.Linear) and not isinstance(parent, LoRALinear):
                pat = _matches(full, targets)
                if pat is not None:
                    found.append((parent, child_name, full, child))
                    used.add(pat)
    unused = [t for t in targets if t not in used]
    if unused or not found:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"LoRA target(s) {unused or targets} match no nn.Linear layer in the model "
            f"(its Linear layers are named: {', '.join(linear) or 'none'})"
        )
    for parent, child_name, _, child in found:
        setattr(parent, child_name, LoRALinear(child, rank, alpha))
    return [full for _, _, full, _ in found]


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRALinear back into a plain nn.Linear (in place). Returns how many."""
    count = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, child_name, child.merged())
                count += 1
    return count
