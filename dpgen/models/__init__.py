"""Generators. Nothing here knows about privacy.

The families and their parts are registered in one place, `dpgen.models.registry.FAMILIES`
(the name a config gives in `model.generator`, the spec stored in every checkpoint, the
network it builds, the trainer, the generator, the probe adapter, the config checks).

- diffusion: pixel-space conditional diffusion (MONAI DiffusionModelUNet, 2D or 3D)
- latent_diffusion: a frozen AutoencoderKL + the same UNet on its latents
- cgan: a conditional DCGAN-style generator/discriminator pair

Lazy: `import dpgen.models.registry` (the config schema does) loads no torch; the networks are
imported when first named.
"""

from dpgen.core.lazy import lazy_exports

_EXPORTS = {
    "ConditionalDiffusion": "diffusion", "DiffusionSpec": "diffusion",
    "diffusion_spec_from_config": "diffusion",
    "AutoencoderSpec": "autoencoder", "LatentAutoencoder": "autoencoder",
    "autoencoder_spec_from_config": "autoencoder",
    "LatentDiffusion": "latent", "LatentDiffusionSpec": "latent",
    "latent_spec_from_config": "latent",
    "ConditionalGAN": "gan", "GANSpec": "gan", "gan_spec_from_config": "gan",
    "FAMILIES": "registry", "Family": "registry", "family": "registry",
    "build_from_checkpoint": "registry",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
