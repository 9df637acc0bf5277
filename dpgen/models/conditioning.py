"""What a generator is conditioned on: a class label and, optionally, named continuous attributes.

Attributes (age, ejection fraction, ...) are mapped to [-1, 1] with *fixed* ranges that the
user writes in the config (public knowledge or a clinical convention), never with statistics
of the private table. The ranges travel with the model spec, so `generate(attributes=...)`
can refuse values the model was never trained on.

Classifier-free guidance needs an unconditional model too: a row's condition can be dropped,
which sets its label to the "null" class and its attribute mask to 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn


def attributes_from_config(config) -> tuple[list[str], list[list[float]]]:
    """(names, fixed ranges) of the conditioning attributes a config names (`data.attributes`)."""
    attrs = config.data.attributes or {}
    return list(attrs), [[float(r.min), float(r.max)] for r in attrs.values()]


@dataclass
class AttributeSpace:
    names: list[str]
    ranges: list[list[float]]  # [[lo, hi], ...] fixed by the user / public data, one per name

    def __post_init__(self) -> None:
        if len(self.names) != len(self.ranges):
            raise ValueError(f"{len(self.names)} attribute names but {len(self.ranges)} ranges")
        for name, (lo, hi) in zip(self.names, self.ranges):
            if not hi > lo:
                raise ValueError(f"attribute {name!r}: range [{lo}, {hi}] is empty")

    def __len__(self) -> int:
        return len(self.names)

    def normalize(self, values: torch.Tensor) -> torch.Tensor:
        """Raw values (N, A) -> [-1, 1], clipped at the fixed range (a public map: no statistics)."""
        lo = torch.tensor([r[0] for r in self.ranges], dtype=values.dtype, device=values.device)
        hi = torch.tensor([r[1] for r in self.ranges], dtype=values.dtype, device=values.device)
        return ((values - lo) / (hi - lo) * 2 - 1).clamp(-1, 1)

    def check(self, values, n: int | None = None) -> torch.Tensor:
        """User-given attribute values -> (N, A) float tensor, or a clear error.

        Accepts an (N, A) array in `names` order, or a dict {name: value or list of N values}.
        """
        if not self.names:
            raise ValueError("this generator was trained without attributes; do not pass attributes")
        if isinstance(values, dict):
            unknown = sorted(set(values) - set(self.names))
            if unknown:
                raise ValueError(
                    f"attribute {unknown[0]!r} is not one this generator was trained on ({', '.join(self.names)})"
                )
            missing = [k for k in self.names if k not in values]
            if missing:
                raise ValueError(f"attribute {missing[0]!r} is missing: give every one of {', '.join(self.names)}")
            cols = []
            for k in self.names:
                v = np.asarray(values[k], dtype=np.float64).reshape(-1)
                if len(v) == 1 and n is not None:
                    v = np.repeat(v, n)
                cols.append(v)
            lens = {len(c) for c in cols}
            if len(lens) != 1:
                raise ValueError(f"attribute value lists have different lengths {sorted(lens)}")
            arr = np.stack(cols, 1)
        else:
            arr = np.asarray(values, dtype=np.float64)
            if arr.ndim == 1 and len(self.names) == 1:
                arr = arr[:, None]
            if arr.ndim != 2 or arr.shape[1] != len(self.names):
                raise ValueError(
                    f"attributes have shape {arr.shape}; expected (n, {len(self.names)}) for {', '.join(self.names)}"
                )
        if n is not None and len(arr) != n:
            raise ValueError(f"{len(arr)} attribute rows for {n} images")
        if not np.isfinite(arr).all():
            raise ValueError("attribute values must be finite")
        for j, (name, (lo, hi)) in enumerate(zip(self.names, self.ranges)):
            bad = arr[(arr[:, j] < lo) | (arr[:, j] > hi), j]
            if len(bad):
                raise ValueError(
                    f"attribute {name!r} = {bad[0]:g} is outside the trained range [{lo:g}, {hi:g}]"
                )
        return torch.as_tensor(arr, dtype=torch.float32)


def pack_condition(labels: torch.Tensor, attributes: torch.Tensor | None, mask: torch.Tensor | None,
                   n_attributes: int, dtype: torch.dtype) -> torch.Tensor:
    """(label, normalized attributes * mask, mask) in one float tensor per row.

    MONAI's UNet hands `class_labels` untouched to its class-embedding module; packing lets a
    richer embedding (`ConditionEmbedding`) take the attributes without changing MONAI.
    """
    b = labels.shape[0]
    if attributes is None:
        attributes = torch.zeros(b, n_attributes, dtype=dtype, device=labels.device)
        mask = torch.zeros(b, dtype=dtype, device=labels.device)
    elif mask is None:
        mask = torch.ones(b, dtype=dtype, device=labels.device)
    mask = mask.to(dtype).reshape(b, 1)
    return torch.cat([labels.to(dtype).reshape(b, 1), attributes.to(dtype) * mask, mask], 1)


class ConditionedSpec:
    """Base of the dataclass specs of conditional networks (`attribute_names`,
    `attribute_ranges` fields): their JSON form and their attribute space."""

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def attributes(self) -> AttributeSpace:
        return AttributeSpace(list(self.attribute_names), [list(r) for r in self.attribute_ranges])


class ConditionEmbedding(nn.Module):
    """Label embedding + an MLP of the (masked) attributes, summed: an added embedding.

    Built from nn.Embedding and nn.Linear only, so Opacus computes exact per-sample
    gradients for it natively.
    """

    def __init__(self, num_embeddings: int, n_attributes: int, dim: int):
        super().__init__()
        self.labels = nn.Embedding(num_embeddings, dim)
        self.attributes = nn.Sequential(nn.Linear(n_attributes + 1, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        labels = packed[:, 0].round().long()
        return self.labels(labels) + self.attributes(packed[:, 1:])
