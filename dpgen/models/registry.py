"""The generator families, registered in one place.

A family is everything dpgen needs to know to run one kind of generator through every stage:

- `spec` / `model`: the spec stored in every checkpoint and the network it builds;
- `spec_from_config(config, image_shape)`: the spec a config asks for (the model builder);
- `trainer`: a module with `pretrain(config, rd, public, image_shape, device, progress)` and
  `finetune(config, rd, private, device, progress)` (public pretraining, then the DP-SGD
  fine-tuning of the network that sees private data, through `dpgen.training.dp`);
- `generator`: the `dpgen.sampling.Generator` subclass `dpgen.load` and the sample stage use;
- `probes`: the `dpgen.probes.adapters.ProbeAdapter` subclass `dpgen audit` uses (membership
  and reconstruction attacks on the network DP-SGD trained);
- `config_checks`: functions that refuse configs the family cannot run (one-line ValueErrors
  the config schema turns into `config error: ...`).

Adding a family: write its parts (a network in dpgen/models/, a trainer in
dpgen/training/families/, a Generator, a ProbeAdapter) and add one `Family` to `FAMILIES`
below; nothing else dispatches on the family's name.

The parts above models/ (trainer, generator, probe adapter) are named as "module:attribute"
and imported when first used: this module imports nothing heavy (the config schema validates
`model.generator` against it without loading torch), and models/ does not import the training,
privacy or probe code that the trainers and adapters are built on.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

# ----------------------------------------------------------------------------- config checks
# Each takes a validated RunConfig and raises ValueError with a message naming the keys.


def attention_trainable_needs_attention_levels(config) -> None:
    ft = config.finetune
    if ft.trainable in ("attention", "attention+conditioning") and not any(config.model.attention_levels):
        raise ValueError(f"finetune.trainable = {ft.trainable!r} but model.attention_levels has no attention level; "
                         f"turn one on or use 'all' / 'lora'")


def no_attention_trainable(config) -> None:
    ft = config.finetune
    if ft.trainable in ("attention", "attention+conditioning"):
        raise ValueError(f"finetune.trainable = {ft.trainable!r} needs attention blocks, which the "
                         f"{config.model.generator} {family(config.model.generator).dp_network} does not have; "
                         f"use 'all' or 'lora'")


def no_autoencoder_finetune(config) -> None:
    if config.autoencoder.finetune.mode == "dp":
        raise ValueError(f"autoencoder.finetune.mode = 'dp' applies only to a generator with an autoencoder "
                         f"(model.generator = 'latent_diffusion'), not {config.model.generator!r}")


def no_guidance(config) -> None:
    if config.sample.guidance_scale != 1.0:
        raise ValueError(f"sample.guidance_scale applies to diffusion models; a {config.model.generator} samples "
                         f"with 1.0")


def no_generator_settings(config) -> None:
    ft = config.finetune
    if ft.generator_steps != 1 or ft.generator_lr is not None or ft.generator_mode_seeking:
        raise ValueError(f"finetune.generator_steps, generator_lr and generator_mode_seeking apply to the cGAN's "
                         f"generator, not to {config.model.generator!r}")


def mode_seeking_needs_pairs(config) -> None:
    if config.finetune.generator_mode_seeking and config.finetune.batch_size < 2:
        raise ValueError("finetune.generator_mode_seeking compares pairs of fakes: finetune.batch_size must be >= 2")


# ----------------------------------------------------------------------------- the record


def _resolve(ref: str) -> Any:
    """"package.module:attribute" -> the attribute; "package.module" -> the module."""
    module, _, attr = ref.partition(":")
    mod = importlib.import_module(module)
    return getattr(mod, attr) if attr else mod


@dataclass(frozen=True)
class Family:
    name: str
    summary: str  # one line for help texts and errors
    dp_network: str  # the network DP-SGD trains on private data, in words
    spec: str  # "module:Class"
    model: str  # "module:Class"
    spec_from_config: str  # "module:function"
    trainer: str  # "module" with pretrain() and finetune()
    generator: str  # "module:Class", a dpgen.sampling.Generator
    probes: str  # "module:Class", a dpgen.probes.adapters.ProbeAdapter
    config_checks: tuple[Callable[[Any], None], ...] = field(default_factory=tuple)

    # what the parts resolve to (imported on first use)
    @property
    def spec_class(self) -> type:
        return _resolve(self.spec)

    @property
    def model_class(self) -> type:
        return _resolve(self.model)

    @property
    def trainer_module(self):
        return _resolve(self.trainer)

    @property
    def generator_class(self) -> type:
        return _resolve(self.generator)

    @property
    def probe_adapter(self) -> type:
        return _resolve(self.probes)

    def build_spec(self, config, image_shape: tuple[int, ...]):
        return _resolve(self.spec_from_config)(config, tuple(image_shape))

    def spec_from_dict(self, spec: dict):
        return self.spec_class(**spec)

    def build_model(self, spec):
        return self.model_class(spec)

    def check_config(self, config) -> None:
        for check in self.config_checks:
            check(config)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family(
        name="diffusion",
        summary="pixel-space conditional diffusion (MONAI DiffusionModelUNet, 2D or 3D); DP-SGD trains the UNet",
        dp_network="diffusion UNet",
        spec="dpgen.models.diffusion:DiffusionSpec",
        model="dpgen.models.diffusion:ConditionalDiffusion",
        spec_from_config="dpgen.models.diffusion:diffusion_spec_from_config",
        trainer="dpgen.training.families.diffusion",
        generator="dpgen.sampling:DiffusionGenerator",
        probes="dpgen.probes.adapters:DiffusionProbes",
        config_checks=(attention_trainable_needs_attention_levels, no_autoencoder_finetune, no_generator_settings),
    ),
    Family(
        name="latent_diffusion",
        summary="a public AutoencoderKL + a conditional diffusion UNet on its latents; DP-SGD trains the UNet "
                "(and, optionally, the autoencoder)",
        dp_network="latent diffusion UNet",
        spec="dpgen.models.latent:LatentDiffusionSpec",
        model="dpgen.models.latent:LatentDiffusion",
        spec_from_config="dpgen.models.latent:latent_spec_from_config",
        trainer="dpgen.training.families.latent",
        generator="dpgen.sampling:LatentDiffusionGenerator",
        probes="dpgen.probes.adapters:LatentDiffusionProbes",
        config_checks=(attention_trainable_needs_attention_levels, no_generator_settings),
    ),
    Family(
        name="cgan",
        summary="conditional DCGAN-style generator + projection discriminator; DP-SGD trains the discriminator, the "
                "generator is post-processing",
        dp_network="discriminator",
        spec="dpgen.models.gan:GANSpec",
        model="dpgen.models.gan:ConditionalGAN",
        spec_from_config="dpgen.models.gan:gan_spec_from_config",
        trainer="dpgen.training.families.gan",
        generator="dpgen.sampling:GANGenerator",
        probes="dpgen.probes.adapters:GANProbes",
        config_checks=(no_attention_trainable, no_autoencoder_finetune, no_guidance, mode_seeking_needs_pairs),
    ),
)}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown generator family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def build_from_checkpoint(path, family_name: str | None = None):
    """(family, model, spec, info): the network a weights file describes, with its tensors loaded
    (safetensors and a JSON spec: never unpickles). `family_name`: refuse a file of another family."""
    from dpgen.core.checkpoints import load_checkpoint

    fam, tensors, spec_dict, info = load_checkpoint(path)
    if family_name is not None and fam != family_name:
        raise ValueError(f"{path} holds a {fam!r} model, expected {family_name!r}")
    f = family(fam)
    spec = f.spec_from_dict(spec_dict)
    model = f.build_model(spec)
    model.load_state_dict(tensors)
    return fam, model, spec, info


__all__ = ["FAMILIES", "Family", "family", "build_from_checkpoint"]
