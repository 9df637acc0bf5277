"""The small networks evaluation trains: one GroupNorm CNN for 2D images and 3D volumes.

The same architecture serves as
- the public encoder (trained on the public dataset; its penultimate layer gives the features
  fidelity metrics are computed on), and
- the downstream classifier of the utility rows (trained on real, DP-real or synthetic data).

GroupNorm, not BatchNorm, so that DP-SGD can train it (BatchNorm mixes samples, which breaks
per-sample clipping); no inplace activations (Opacus' hooks need the activations intact).

Inputs are float tensors in the model range [-1, 1], channel-first. Large inputs are
average-pooled down to at most `max_side` voxels per axis first: a 64^3 volume through full-
resolution 3D convolutions is hours of CPU per epoch, and the classifier is a yardstick, not
the product.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CNNSpec:
    in_channels: int
    num_classes: int
    spatial_dims: int = 2
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    feature_dim: int = 64
    groups: int = 8
    max_side: int = 32

    def to_dict(self) -> dict:
        return asdict(self)


def _conv(dims: int):
    return nn.Conv2d if dims == 2 else nn.Conv3d


class SmallCNN(nn.Module):
    """conv blocks (stride-2 between widths) -> global average pool -> `feature_dim` -> logits.

    ~150k parameters in 2D with the default widths; `features(x)` is the penultimate layer.
    """

    def __init__(self, spec: CNNSpec):
        super().__init__()
        if spec.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spec.spatial_dims}")
        self.spec = spec
        Conv = _conv(spec.spatial_dims)
        layers: list[nn.Module] = []
        c_in = spec.in_channels
        for i, w in enumerate(spec.widths):
            layers += [Conv(c_in, w, 3, padding=1), nn.GroupNorm(min(spec.groups, w), w), nn.SiLU()]
            if i < len(spec.widths) - 1:
                layers += [Conv(w, w, 3, stride=2, padding=1), nn.GroupNorm(min(spec.groups, w), w), nn.SiLU()]
            c_in = w
        self.body = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Linear(c_in, spec.feature_dim), nn.SiLU())
        self.head = nn.Linear(spec.feature_dim, spec.num_classes)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        side = max(x.shape[2:])
        if side > self.spec.max_side:
            factor = -(-side // self.spec.max_side)  # ceil
            pool = F.avg_pool2d if self.spec.spatial_dims == 2 else F.avg_pool3d
            x = pool(x, factor, ceil_mode=True)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(self._prepare(x))
        h = h.mean(dim=tuple(range(2, h.ndim)))
        return self.embed(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
