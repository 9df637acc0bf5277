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

_EXPORTS = {
    "ConditionalDiffusion": "dpgen.models.diffusion", "DiffusionSpec": "dpgen.models.diffusion",
    "diffusion_spec_from_config": "dpgen.models.diffusion",
    "AutoencoderSpec": "dpgen.models.autoencoder", "LatentAutoencoder": "dpgen.models.autoencoder",
    "autoencoder_spec_from_config": "dpgen.models.autoencoder",
    "LatentDiffusion": "dpgen.models.latent", "LatentDiffusionSpec": "dpgen.models.latent",
    "latent_spec_from_config": "dpgen.models.latent",
    "ConditionalGAN": "dpgen.models.gan", "GANSpec": "dpgen.models.gan", "gan_spec_from_config": "dpgen.models.gan",
    "FAMILIES": "dpgen.models.registry", "Family": "dpgen.models.registry", "family": "dpgen.models.registry",
    "build_from_checkpoint": "dpgen.models.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dpgen.models' has no attribute {name!r}")
