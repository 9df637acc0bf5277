"""Conditional DCGAN-style generator and discriminator, 2D or 3D.

The discriminator is the network DP-SGD trains on private data, so it follows the rules
that make per-sample gradients exact: GroupNorm (no BatchNorm, which mixes samples), no
inplace activations, only layers Opacus has grad samplers for (Conv, Linear, Embedding,
GroupNorm). It is a projection discriminator (Miyato & Koyama 2018): the score is
`fc(h) + <embed(y), h> (+ <W a, h>)` on globally pooled features h, so the label and the
attributes enter without widening the input.

The generator never sees private data; it learns only from the discriminator's scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dpgen.models.conditioning import ConditionedSpec, attributes_from_config

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}


@dataclass
class GANSpec(ConditionedSpec):
    spatial_dims: int
    in_channels: int
    num_classes: int
    image_shape: list[int]
    latent_dim: int = 64
    generator_channels: list[int] = field(default_factory=lambda: [128, 64, 32])
    discriminator_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    norm_num_groups: int = 8
    attribute_names: list[str] = field(default_factory=list)
    generator_norm: str = "group"  # "batch" | "group" (checkpoints written before the option: group)
    attribute_ranges: list[list[float]] = field(default_factory=list)

    @property
    def base_shape(self) -> list[int]:
        f = 2 ** (len(self.generator_channels) - 1)
        spatial = self.image_shape[1:]
        if any(s % f for s in spatial):
            raise ValueError(
                f"the cGAN generator doubles its grid {len(self.generator_channels) - 1} time(s) "
                f"(len(model.gan.generator_channels) - 1), so every spatial size must be divisible by {f}; "
                f"got {tuple(spatial)}"
            )
        return [s // f for s in spatial]


def gan_spec_from_config(config, image_shape: tuple[int, ...]) -> GANSpec:
    g = config.model.gan
    names, ranges = attributes_from_config(config)
    spec = GANSpec(
        spatial_dims=len(image_shape) - 1, in_channels=image_shape[0], num_classes=config.data.num_classes,
        image_shape=list(image_shape), latent_dim=g.latent_dim, generator_channels=list(g.generator_channels),
        discriminator_channels=list(g.discriminator_channels), norm_num_groups=g.norm_num_groups,
        attribute_names=names, attribute_ranges=ranges, generator_norm=g.generator_norm,
    )
    spec.base_shape  # raises on sizes the generator cannot produce
    return spec


def _condition_input(labels: torch.Tensor, attributes: torch.Tensor | None, mask: torch.Tensor | None,
                     n_attr: int, dtype) -> torch.Tensor:
    b = labels.shape[0]
    if attributes is None:
        return torch.zeros(b, n_attr + 1, dtype=dtype, device=labels.device)
    m = (torch.ones(b, device=labels.device) if mask is None else mask).to(dtype).reshape(b, 1)
    return torch.cat([attributes.to(dtype) * m, m], 1)


class ConditionalGenerator(nn.Module):
    def __init__(self, spec: GANSpec):
        super().__init__()
        self.spec = spec
        d, ch = spec.spatial_dims, spec.generator_channels
        conv = _CONV[d]
        self.base = spec.base_shape
        n_attr = len(spec.attribute_names)
        self.n_attributes = n_attr
        emb = max(16, spec.latent_dim // 2)
        self.label_embedding = nn.Embedding(spec.num_classes + 1, emb)
        in_dim = spec.latent_dim + emb + (n_attr + 1 if n_attr else 0)
        numel = ch[0]
        for s in self.base:
            numel *= s
        self.fc = nn.Linear(in_dim, numel)
        if spec.generator_norm == "batch":
            # Batch statistics mix the rows of a batch: fine for the generator, which never sees
            # private data, as long as the fakes a DP step pairs with private rows are drawn in
            # eval mode (running statistics; `DiscriminatorObjective.fakes`).
            norm = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[d]
        else:
            norm = lambda c: nn.GroupNorm(min(spec.norm_num_groups, c), c)  # noqa: E731
        blocks = [norm(ch[0]), nn.SiLU()]
        for c_in, c_out in zip(ch[:-1], ch[1:]):
            blocks += [nn.Upsample(scale_factor=2, mode="nearest"), conv(c_in, c_out, 3, padding=1), norm(c_out),
                       nn.SiLU()]
        blocks += [conv(ch[-1], spec.in_channels, 3, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*blocks)

    @property
    def null_label(self) -> int:
        return self.spec.num_classes

    def forward(self, z: torch.Tensor, labels: torch.Tensor, attributes: torch.Tensor | None = None,
                attr_mask: torch.Tensor | None = None) -> torch.Tensor:
        parts = [z, self.label_embedding(labels).to(z.dtype)]
        if self.n_attributes:
            parts.append(_condition_input(labels, attributes, attr_mask, self.n_attributes, z.dtype))
        h = self.fc(torch.cat(parts, 1)).view(z.shape[0], self.spec.generator_channels[0], *self.base)
        return self.net(h)


class ConditionalDiscriminator(nn.Module):
    def __init__(self, spec: GANSpec):
        super().__init__()
        self.spec = spec
        d, ch = spec.spatial_dims, spec.discriminator_channels
        conv = _CONV[d]
        layers = [conv(spec.in_channels, ch[0], 3, padding=1), nn.LeakyReLU(0.2, inplace=False)]
        for c_in, c_out in zip(ch[:-1], ch[1:]):
            layers += [conv(c_in, c_out, 4, stride=2, padding=1),
                       nn.GroupNorm(min(spec.norm_num_groups, c_out), c_out), nn.LeakyReLU(0.2, inplace=False)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(ch[-1], 1)
        self.label_embedding = nn.Embedding(spec.num_classes + 1, ch[-1])
        self.n_attributes = len(spec.attribute_names)
        if self.n_attributes:
            self.attribute_projection = nn.Linear(self.n_attributes + 1, ch[-1])

    def forward(self, x: torch.Tensor, labels: torch.Tensor, attributes: torch.Tensor | None = None,
                attr_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(x).flatten(2).mean(2)  # (B, C): global average pooling
        score = self.fc(h)[:, 0] + (self.label_embedding(labels) * h).sum(1)
        if self.n_attributes:
            a = _condition_input(labels, attributes, attr_mask, self.n_attributes, h.dtype)
            score = score + (self.attribute_projection(a) * h).sum(1)
        return score


class ConditionalGAN(nn.Module):
    """The pair, so one state dict (keys `generator.*`, `discriminator.*`) holds both."""

    def __init__(self, spec: GANSpec):
        super().__init__()
        self.spec = spec
        self.generator = ConditionalGenerator(spec)
        self.discriminator = ConditionalDiscriminator(spec)
