"""What `dpgen audit` needs from each generator family (registered in dpgen.models.registry).

The probes attack the network the run's DP-SGD trained, so what they compute depends on the
family; the audit stage (dpgen.probes.stage) asks the family's adapter for three things:

- `scores(model, reference, ...)`: per-image membership scores of members and non-members
  (`membership.Scores`) under a model, calibrated by a reference model when there is one;
- `overfit_control(...)`: a copy of the public pretrained model whose DP-trained network is
  trained WITHOUT DP on a few private images (the control that shows the attack can win);
- `inversion_target(...)`: the loss of one private row under that network, for the gradient
  inversion and identification attacks on one DP-SGD update.

Families:
- diffusion: denoising-loss attack on the UNet in pixel space; the diffusion loss;
- latent diffusion: the same in latent space: each model's images are encoded by its own
  autoencoder (the run's may be DP fine-tuned; the pretrained one is public) and scaled as in
  training; the inversion runs through the frozen encoder, in pixel space;
- cGAN: the discriminator's score (the DP-trained network; the generator is post-processing
  of it), calibrated by the public pretrained discriminator; the discriminator's loss.

Memorization (nearest private neighbours of the cohort) needs no adapter: it reads the cohort.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dpgen.probes import membership as mia
from dpgen.probes import reconstruction as rec


class ProbeAdapter:
    """The family-independent part; subclasses say what the DP-trained network is."""

    family = "?"
    attack = ""  # the membership attack, in words (goes into the results)

    def __init__(self, config, pretrained: nn.Module, finetuned: nn.Module | None):
        self.config = config
        self.pre = pretrained  # the public pretrained model (the reference)
        self.ft = finetuned  # the DP fine-tuned model (None: the run has none)

    @property
    def num_classes(self) -> int:
        return self.pre.spec.num_classes

    def labels(self, y: torch.Tensor, options: mia.LossAttackOptions) -> torch.Tensor:
        """The true labels (the attacker knows them: strongest), or the null label."""
        return y if options.use_labels else torch.full_like(y, self.num_classes)

    def scores(self, model: nn.Module, reference: nn.Module | None, x_members: torch.Tensor, y_members: torch.Tensor,
               x_non: torch.Tensor, y_non: torch.Tensor, options: mia.LossAttackOptions, device, progress: bool,
               name: str) -> mia.Scores:
        raise NotImplementedError

    def overfit_control(self, x: torch.Tensor, y: torch.Tensor, options: mia.OverfitOptions, device,
                        progress: bool) -> tuple[nn.Module, dict]:
        raise NotImplementedError

    def inversion_target(self, image_shape: tuple[int, ...], options: rec.InversionOptions) -> rec.Target:
        raise NotImplementedError


class DiffusionProbes(ProbeAdapter):
    family = "diffusion"
    attack = ("denoising-error (loss) attack at fixed timesteps and fixed noise (SecMI/PIA idea); 'reference' "
              "calibrates each image by the public-only pretrained model's error")
    target_name = "diffusion_loss"

    def unet(self, model: nn.Module) -> nn.Module:
        return model

    def inputs(self, model: nn.Module, x: torch.Tensor, device) -> torch.Tensor:
        """What the UNet denoises for images `x` (model range): the images themselves."""
        return x

    def alphas_cumprod(self) -> torch.Tensor:
        from dpgen.models.diffusion import make_train_scheduler

        return make_train_scheduler(self.unet(self.pre).spec).alphas_cumprod

    def scores(self, model, reference, x_members, y_members, x_non, y_non, options, device, progress, name):
        ref = None if reference is None else self.unet(reference)
        ref_inputs = None if reference is None else (self.inputs(reference, x_members, device),
                                                     self.inputs(reference, x_non, device))
        sm = mia.score_model(self.unet(model), ref, self.alphas_cumprod(), self.inputs(model, x_members, device),
                             y_members, self.inputs(model, x_non, device), y_non, options, device=device,
                             progress=progress, null_label=self.num_classes, name=name, reference_inputs=ref_inputs)
        return mia.denoising_scores(sm)

    def overfit_control(self, x, y, options, device, progress):
        from dpgen.training.objectives import DiffusionObjective

        control = copy.deepcopy(self.pre)
        unet = self.unet(control)
        info = mia.overfit(unet, DiffusionObjective(unet, self.config.model.cond_drop_prob),
                           {"x": self.inputs(self.pre, x, device), "labels": y}, options, device, progress)
        return control, info

    def inversion_target(self, image_shape, options):
        pre = copy.deepcopy(self.pre).cpu().float().eval()
        unet = self.unet(pre)
        t_k = max(1, int(round(options.diffusion_timestep_fraction * unet.spec.num_train_timesteps)))
        return rec.diffusion_target(unet, self.alphas_cumprod(), t_k, tuple(unet.spec.image_shape), options.seed,
                                    encode=self.encoder(pre), name=self.target_name)

    def encoder(self, model: nn.Module):
        return None


class LatentDiffusionProbes(DiffusionProbes):
    family = "latent_diffusion"
    attack = ("denoising-error (loss) attack in latent space at fixed timesteps and fixed noise (SecMI/PIA idea): "
              "each model's images encoded by its own autoencoder; 'reference' calibrates each image by the "
              "public-only pretrained model's error")
    target_name = "latent_diffusion_loss"

    def unet(self, model):
        return model.unet

    def inputs(self, model, x, device):
        """The scaled latents the UNet saw in training (this model's own autoencoder, mean latent)."""
        from dpgen.models.autoencoder import encode_dataset

        return encode_dataset(model.autoencoder, x, device) * model.spec.scale_factor

    def encoder(self, model):
        ae, scale = model.autoencoder, model.spec.scale_factor
        for p in ae.parameters():
            p.requires_grad_(False)  # the attacker differentiates through the frozen encoder, never into it
        return lambda x: ae.encode_mean(x) * scale


class GANProbes(ProbeAdapter):
    family = "cgan"
    attack = ("discriminator-score attack: the DP-trained discriminator's 'real' logit of each image; 'reference' "
              "subtracts the public-only pretrained discriminator's logit")

    def scores(self, model, reference, x_members, y_members, x_non, y_non, options, device, progress, name):
        return mia.discriminator_attack(
            model.discriminator, x_members, x_non, self.labels(y_members, options), self.labels(y_non, options),
            reference=None if reference is None else reference.discriminator, batch_size=options.batch_size,
            device=device)

    def overfit_control(self, x, y, options, device, progress):
        from dpgen.training.objectives import DiscriminatorObjective

        control = copy.deepcopy(self.pre).to(device)
        for p in control.generator.parameters():
            p.requires_grad_(False)  # the control trains the discriminator, what DP-SGD trains in the run
        objective = DiscriminatorObjective(control.generator, control.spec)
        info = mia.overfit(control.discriminator, objective, {"x": x, "labels": y}, options, device, progress)
        return control, info

    def inversion_target(self, image_shape, options):
        pre = copy.deepcopy(self.pre).cpu().float().eval()
        return rec.discriminator_target(pre.discriminator, pre.generator, pre.spec.latent_dim, options.seed)


__all__ = ["ProbeAdapter", "DiffusionProbes", "LatentDiffusionProbes", "GANProbes"]
