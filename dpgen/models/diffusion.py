"""Class-conditional diffusion: MONAI's DiffusionModelUNet (2D or 3D) + diffusers schedulers.

The UNet predicts the noise added to an image at a timestep. Labels enter through MONAI's
class embedding; index `num_classes` is the "null" label used for classifier-free guidance
(labels are dropped to it with probability `cond_drop_prob` in training).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from monai.networks.nets import DiffusionModelUNet
from torch import nn


@dataclass
class DiffusionSpec:
    """Everything needed to rebuild the network (stored beside each checkpoint)."""

    spatial_dims: int
    in_channels: int
    num_classes: int
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    attention_levels: list[bool] = field(default_factory=lambda: [False, False, True])
    num_res_blocks: int = 1
    num_head_channels: int = 32
    norm_num_groups: int = 16
    num_train_timesteps: int = 1000
    image_shape: list[int] = field(default_factory=list)  # (C, *spatial) of the training data

    def to_dict(self) -> dict:
        return asdict(self)


class ConditionalDiffusion(nn.Module):
    """Noise-prediction UNet with a class embedding (+1 row for the null label)."""

    def __init__(self, spec: DiffusionSpec):
        super().__init__()
        self.spec = spec
        self.unet = DiffusionModelUNet(
            spatial_dims=spec.spatial_dims,
            in_channels=spec.in_channels,
            out_channels=spec.in_channels,
            num_res_blocks=spec.num_res_blocks,
            channels=list(spec.channels),
            attention_levels=list(spec.attention_levels),
            norm_num_groups=spec.norm_num_groups,
            num_head_channels=spec.num_head_channels,
            num_class_embeds=spec.num_classes + 1,
        )

    @property
    def null_label(self) -> int:
        return self.spec.num_classes

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(x, timesteps, class_labels=labels)


def make_train_scheduler(spec: DiffusionSpec) -> DDPMScheduler:
    # Cosine schedule: better than linear at small resolutions (Nichol & Dhariwal 2021).
    return DDPMScheduler(num_train_timesteps=spec.num_train_timesteps, beta_schedule="squaredcos_cap_v2")


def make_sample_scheduler(spec: DiffusionSpec, kind: str = "ddim"):
    train = make_train_scheduler(spec)
    if kind == "ddim":
        return DDIMScheduler.from_config(train.config)
    if kind == "ddpm":
        return DDPMScheduler.from_config(train.config)
    raise ValueError(f"unknown sampler {kind!r}; choose ddim or ddpm")


def diffusion_loss(
    model: nn.Module,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator | None = None,
    cond_drop_prob: float = 0.0,
    null_label: int | None = None,
) -> torch.Tensor:
    """Per-sample epsilon-prediction MSE (shape (B,)), with one (t, noise) draw per row.

    Randomness comes from `generator`, so a step is a deterministic function of its seed
    (what makes a killed-and-resumed run identical to an uninterrupted one).
    """
    b = x0.shape[0]
    dev = x0.device
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator, device="cpu").to(dev)
    noise = torch.randn(x0.shape, generator=generator, device="cpu").to(dev)
    if cond_drop_prob > 0:
        drop = torch.rand(b, generator=generator, device="cpu").to(dev) < cond_drop_prob
        labels = torch.where(drop, torch.full_like(labels, null_label), labels)
    xt = scheduler.add_noise(x0, noise, t)
    pred = model(xt, t, labels)
    return (pred - noise).pow(2).flatten(1).mean(1)
