"""The autoencoder of latent diffusion: MONAI's AutoencoderKL (2D or 3D).

It is trained on public data, then frozen (by default); the diffusion UNet works in its
latent space. Latents are scaled by `scale_factor` (1 / std of the *public* latents, as in
Rombach et al.) so the UNet sees roughly unit-variance inputs.

Note for DP: MONAI's AutoencoderKL feeds some convolutions channels-last activations, the
case where Opacus' hooks give wrong per-sample gradients. When the autoencoder itself is
fine-tuned with DP-SGD, dpgen makes every conv input contiguous and the preflight proves the
per-sample gradients exact on this very model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from monai.networks.nets import AutoencoderKL
from torch import nn


@dataclass
class AutoencoderSpec:
    spatial_dims: int
    in_channels: int
    image_shape: list[int]  # (C, *spatial) of the images
    channels: list[int] = field(default_factory=lambda: [32, 64])
    latent_channels: int = 3
    num_res_blocks: int = 1
    norm_num_groups: int = 16
    attention: bool = False  # non-local attention in the encoder/decoder middle blocks

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def latent_shape(self) -> list[int]:
        return latent_shape(self)


def autoencoder_spec_from_config(config, image_shape: tuple[int, ...]) -> AutoencoderSpec:
    a = config.autoencoder
    spec = AutoencoderSpec(
        spatial_dims=len(image_shape) - 1, in_channels=image_shape[0], image_shape=list(image_shape),
        channels=list(a.channels), latent_channels=a.latent_channels, num_res_blocks=a.num_res_blocks,
        norm_num_groups=a.norm_num_groups, attention=a.attention,
    )
    shape = spec.latent_shape  # raises on shapes it cannot encode
    if a.latent_shape is not None and list(a.latent_shape) != list(shape):
        raise ValueError(
            f"autoencoder.latent_shape = {list(a.latent_shape)}, but this autoencoder can only produce latents of "
            f"shape {shape} from images of shape {list(image_shape)} ({a.latent_channels} channels, spatial size / "
            f"{spec.downsample_factor})"
        )
    return spec


def latent_shape(spec: AutoencoderSpec) -> list[int]:
    """(latent_channels, *spatial / factor), or a clear error when the images cannot be encoded
    to a whole latent grid."""
    f = spec.downsample_factor
    spatial = list(spec.image_shape[1:])
    bad = [s for s in spatial if s % f]
    if bad:
        raise ValueError(
            f"the autoencoder halves the image {len(spec.channels) - 1} time(s) (len(autoencoder.channels) - 1), "
            f"so every spatial size must be divisible by {f}; images of shape {tuple(spatial)} cannot be encoded "
            f"(use fewer autoencoder levels or resample the images)"
        )
    return [spec.latent_channels, *(s // f for s in spatial)]


class LatentAutoencoder(nn.Module):
    """AutoencoderKL plus the two things latent diffusion needs: the mean latent of an image
    (deterministic encoding) and decoding of a scaled latent."""

    def __init__(self, spec: AutoencoderSpec):
        super().__init__()
        self.spec = spec
        latent_shape(spec)  # raises early on shapes it cannot encode
        self.ae = AutoencoderKL(
            spatial_dims=spec.spatial_dims,
            in_channels=spec.in_channels,
            out_channels=spec.in_channels,
            channels=list(spec.channels),
            latent_channels=spec.latent_channels,
            num_res_blocks=spec.num_res_blocks,
            norm_num_groups=spec.norm_num_groups,
            attention_levels=[False] * len(spec.channels),
            with_encoder_nonlocal_attn=spec.attention,
            with_decoder_nonlocal_attn=spec.attention,
        )

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None):
        """Reconstruction, mu, sigma. `eps` (standard normal, latent-shaped) makes the
        posterior sample a deterministic function of the caller's generator."""
        mu, sigma = self.ae.encode(x)
        z = mu if eps is None else mu + eps.to(mu.dtype) * sigma
        return self.ae.decode(z), mu, sigma

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.ae.encode(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.ae.decode(z)


def autoencoder_loss_rows(model: nn.Module, x: torch.Tensor, eps: torch.Tensor, kl_weight: float,
                          reconstruction: str = "l1") -> torch.Tensor:
    """Per-row VAE loss: reconstruction (L1 or MSE) + kl_weight * KL(q(z|x) || N(0, I)), means
    over elements. MSE suits sparse binary masks (L1 first settles on "all background")."""
    rec, mu, sigma = model(x, eps)
    err = rec - x
    rec_loss = (err.abs() if reconstruction == "l1" else err.pow(2)).flatten(1).mean(1)
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - 2 * torch.log(sigma.clamp_min(1e-12)) - 1).flatten(1).mean(1)
    return rec_loss + kl_weight * kl


@torch.no_grad()
def encode_dataset(ae: LatentAutoencoder, data: torch.Tensor, device, batch_size: int = 64) -> torch.Tensor:
    """Mean latents of every row (the frozen encoder is a fixed map: no randomness)."""
    ae.eval()
    out = []
    for i in range(0, len(data), batch_size):
        out.append(ae.encode_mean(data[i:i + batch_size].to(device)).float().cpu())
    return torch.cat(out)
