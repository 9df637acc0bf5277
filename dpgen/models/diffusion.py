"""Conditional diffusion: MONAI's DiffusionModelUNet (2D or 3D) + diffusers schedulers.

The UNet predicts the noise added to an image (or a latent) at a timestep, or, with
`prediction_type` "v_prediction" / "sample", v or the clean image. Labels enter
through MONAI's class embedding; index `num_classes` is the "null" label used for
classifier-free guidance (labels are dropped to it with probability `cond_drop_prob` in
training). Continuous attributes, when the model has them, enter through the same added
embedding (`ConditionEmbedding`: label embedding + an MLP of the attributes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from dpgen.models.conditioning import ConditionedSpec, ConditionEmbedding, attributes_from_config, pack_condition

SAMPLERS = ("ddim", "ddpm", "dpmsolver++")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class DiffusionSpec(ConditionedSpec):
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
    prediction_type: str = "epsilon"  # what the UNet outputs: the noise, v (Salimans & Ho 2022) or x0
    image_shape: list[int] = field(default_factory=list)  # (C, *spatial) of what the UNet sees
    attribute_names: list[str] = field(default_factory=list)
    attribute_ranges: list[list[float]] = field(default_factory=list)


class ConditionalDiffusion(nn.Module):
    """Noise-prediction UNet with a class embedding (+1 row for the null label) and, when
    the spec names attributes, an attribute MLP added to it."""

    def __init__(self, spec: DiffusionSpec):
        super().__init__()
        self.spec = spec
        levels = len(spec.channels) - 1
        for size in spec.image_shape[1:]:
            if size % (2 ** levels):
                raise ValueError(
                    f"the UNet halves its input {levels} time(s) (len(model.channels) - 1), so every spatial size "
                    f"must be divisible by {2 ** levels}; got {tuple(spec.image_shape[1:])}"
                )
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
        self.n_attributes = len(spec.attribute_names)
        if self.n_attributes:
            dim = self.unet.class_embedding.embedding_dim
            self.unet.class_embedding = ConditionEmbedding(spec.num_classes + 1, self.n_attributes, dim)

    @property
    def null_label(self) -> int:
        return self.spec.num_classes

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor,
                attributes: torch.Tensor | None = None, attr_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`attributes`: normalized (B, A) in [-1, 1]; `attr_mask`: 1 where given, 0 where
        dropped (classifier-free guidance) or unknown."""
        if self.n_attributes:
            cond = pack_condition(labels, attributes, attr_mask, self.n_attributes, x.dtype)
            return self.unet(x, timesteps, class_labels=cond)
        return self.unet(x, timesteps, class_labels=labels)


def diffusion_spec_from_config(config, image_shape: tuple[int, ...]) -> DiffusionSpec:
    """The UNet for inputs of `image_shape` (images for pixel diffusion, latents for latent)."""
    m = config.model
    names, ranges = attributes_from_config(config)
    return DiffusionSpec(
        spatial_dims=len(image_shape) - 1,
        in_channels=image_shape[0],
        num_classes=config.data.num_classes,
        channels=list(m.channels),
        attention_levels=list(m.attention_levels),
        num_res_blocks=m.num_res_blocks,
        num_head_channels=m.num_head_channels,
        norm_num_groups=m.norm_num_groups,
        num_train_timesteps=m.num_train_timesteps,
        prediction_type=m.prediction_type,
        image_shape=list(image_shape),
        attribute_names=names,
        attribute_ranges=ranges,
    )


def make_train_scheduler(spec: DiffusionSpec) -> DDPMScheduler:
    # Cosine schedule: better than linear at small resolutions (Nichol & Dhariwal 2021).
    return DDPMScheduler(num_train_timesteps=spec.num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                         prediction_type=spec.prediction_type)


def regression_target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to output for x_t = sqrt(ac) x0 + sqrt(1 - ac) noise (`ac`
    broadcast to x0's shape)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return ac.sqrt() * noise - (1 - ac).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")


def make_sample_scheduler(spec: DiffusionSpec, kind: str = "ddim"):
    """A sampler built from the training scheduler's config, so the noise schedule matches."""
    train = make_train_scheduler(spec)
    if kind == "ddim":
        return DDIMScheduler.from_config(train.config)
    if kind == "ddpm":
        return DDPMScheduler.from_config(train.config)
    if kind in ("dpmsolver++", "dpm++", "dpmsolver"):
        return DPMSolverMultistepScheduler.from_config(train.config, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown sampler {kind!r}; choose one of {', '.join(SAMPLERS)}")
