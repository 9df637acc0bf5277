"""Generators. Nothing here knows about privacy.

Three families, one registry (`FAMILIES`): the name a config gives in `model.generator`, the
spec class stored in every checkpoint, and the module that spec builds.

- diffusion: pixel-space conditional diffusion (MONAI DiffusionModelUNet, 2D or 3D)
- latent_diffusion: a frozen AutoencoderKL + the same UNet on its latents
- cgan: a conditional DCGAN-style generator/discriminator pair
"""

from __future__ import annotations

from dataclasses import dataclass

from dpgen.models.autoencoder import AutoencoderSpec, LatentAutoencoder
from dpgen.models.diffusion import ConditionalDiffusion, DiffusionSpec
from dpgen.models.gan import ConditionalGAN, GANSpec
from dpgen.models.latent import LatentDiffusion, LatentDiffusionSpec

__all__ = [
    "ConditionalDiffusion", "DiffusionSpec", "AutoencoderSpec", "LatentAutoencoder", "LatentDiffusion",
    "LatentDiffusionSpec", "ConditionalGAN", "GANSpec", "FAMILIES", "diffusion_spec_from_config",
    "autoencoder_spec_from_config", "gan_spec_from_config", "spec_from_dict", "build_model",
]


@dataclass(frozen=True)
class Family:
    name: str
    spec_class: type
    model_class: type


FAMILIES = {
    "diffusion": Family("diffusion", DiffusionSpec, ConditionalDiffusion),
    "latent_diffusion": Family("latent_diffusion", LatentDiffusionSpec, LatentDiffusion),
    "cgan": Family("cgan", GANSpec, ConditionalGAN),
}


def _family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown generator family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def spec_from_dict(family: str, spec: dict):
    return _family(family).spec_class(**spec)


def build_model(family: str, spec):
    return _family(family).model_class(spec)


def _attributes(config) -> tuple[list[str], list[list[float]]]:
    attrs = config.data.attributes or {}
    return list(attrs), [[float(r.min), float(r.max)] for r in attrs.values()]


def diffusion_spec_from_config(config, image_shape: tuple[int, ...]) -> DiffusionSpec:
    """The UNet for inputs of `image_shape` (images for pixel diffusion, latents for latent)."""
    m = config.model
    names, ranges = _attributes(config)
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


def gan_spec_from_config(config, image_shape: tuple[int, ...]) -> GANSpec:
    g = config.model.gan
    names, ranges = _attributes(config)
    spec = GANSpec(
        spatial_dims=len(image_shape) - 1, in_channels=image_shape[0], num_classes=config.data.num_classes,
        image_shape=list(image_shape), latent_dim=g.latent_dim, generator_channels=list(g.generator_channels),
        discriminator_channels=list(g.discriminator_channels), norm_num_groups=g.norm_num_groups,
        attribute_names=names, attribute_ranges=ranges,
    )
    spec.base_shape  # raises on sizes the generator cannot produce
    return spec
