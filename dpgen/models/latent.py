"""Latent diffusion = a frozen autoencoder + a conditional diffusion UNet on its latents."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dpgen.models.autoencoder import AutoencoderSpec, LatentAutoencoder, autoencoder_spec_from_config
from dpgen.models.diffusion import ConditionalDiffusion, DiffusionSpec, diffusion_spec_from_config


@dataclass
class LatentDiffusionSpec:
    unet: DiffusionSpec  # its image_shape is the latent shape
    autoencoder: AutoencoderSpec
    scale_factor: float  # latents are multiplied by this before the UNet sees them (public estimate)

    def __post_init__(self) -> None:
        if isinstance(self.unet, dict):
            self.unet = DiffusionSpec(**self.unet)
        if isinstance(self.autoencoder, dict):
            self.autoencoder = AutoencoderSpec(**self.autoencoder)
        check_latent_match(self.unet, self.autoencoder)

    def to_dict(self) -> dict:
        return {"unet": self.unet.to_dict(), "autoencoder": self.autoencoder.to_dict(), "scale_factor": self.scale_factor}

    @property
    def image_shape(self) -> list[int]:
        return list(self.autoencoder.image_shape)

    @property
    def num_classes(self) -> int:
        return self.unet.num_classes

    @property
    def attributes(self):
        return self.unet.attributes


def latent_spec_from_config(config, image_shape: tuple[int, ...]) -> LatentDiffusionSpec:
    """The two networks' specs (scale factor 1 until the public latents are measured); raises
    (with the shapes) when the autoencoder cannot produce a latent grid the UNet accepts."""
    ae = autoencoder_spec_from_config(config, tuple(image_shape))
    unet = diffusion_spec_from_config(config, tuple(ae.latent_shape))
    return LatentDiffusionSpec(unet=unet, autoencoder=ae, scale_factor=1.0)


def check_latent_match(unet: DiffusionSpec, ae: AutoencoderSpec) -> None:
    produced = ae.latent_shape
    if list(unet.image_shape) != list(produced):
        raise ValueError(
            f"the diffusion UNet expects latents of shape {tuple(unet.image_shape)}, but the autoencoder produces "
            f"{tuple(produced)} from images of shape {tuple(ae.image_shape)}"
        )


class LatentDiffusion(nn.Module):
    def __init__(self, spec: LatentDiffusionSpec):
        super().__init__()
        self.spec = spec
        self.unet = ConditionalDiffusion(spec.unet)
        self.autoencoder = LatentAutoencoder(spec.autoencoder)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode_mean(x) * self.spec.scale_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z / self.spec.scale_factor)
