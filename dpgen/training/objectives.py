"""Training objectives, written so that DP-SGD can check and use them.

An objective splits a training step in two: `draw` makes every random input of a batch
(timesteps, noise, dropped conditions, GAN latents and fakes) from a generator, and `loss`
maps a model and such a batch to one loss per row. The split is what lets the privacy
preflight replay the same rows one at a time, and what makes a step a deterministic function
of its seed. Every objective has the same three methods the DP loop uses:

- `draw_rows(rows, generator)`: rows = {"x", "labels", optional "attributes", "attr_mask"}
- `loss(model, batch)` -> (B,)
- `preflight_batch(n, generator)`: random inputs of the shape the DP-trained network sees
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpgen.models.autoencoder import AutoencoderSpec, autoencoder_loss_rows, latent_shape
from dpgen.models.diffusion import ConditionalDiffusion, make_train_scheduler, regression_target


def _random_condition(n: int, num_classes: int, n_attr: int, generator: torch.Generator) -> dict:
    out = {"labels": torch.randint(0, num_classes + 1, (n,), generator=generator)}
    if n_attr:
        out["attributes"] = torch.rand((n, n_attr), generator=generator) * 2 - 1
        out["attr_mask"] = (torch.rand(n, generator=generator) < 0.7).float()
    return out


class DiffusionObjective:
    """Denoising MSE (epsilon, v or x0 target, as the spec says) with classifier-free condition
    dropout (pixels or latents)."""

    def __init__(self, model: ConditionalDiffusion, cond_drop_prob: float = 0.1):
        self.spec = model.spec
        self.scheduler = make_train_scheduler(model.spec)
        self.cond_drop_prob = cond_drop_prob
        self.null_label = model.null_label
        self.n_attributes = len(model.spec.attribute_names)

    def draw(self, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
             attributes: torch.Tensor | None = None, attr_mask: torch.Tensor | None = None) -> dict:
        b = x0.shape[0]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        drop = torch.rand(b, generator=generator) < self.cond_drop_prob
        labels = torch.where(drop, torch.full_like(labels, self.null_label), labels.cpu())
        dev = x0.device
        batch = {"x0": x0, "labels": labels.to(dev), "t": t.to(dev), "noise": noise.to(dev, x0.dtype)}
        if self.n_attributes:
            # The label and the attributes are dropped together: the guided direction is
            # "this condition" vs "no condition".
            if attributes is None:
                attributes = torch.zeros(b, self.n_attributes)
                attr_mask = torch.zeros(b)
            keep = (torch.ones(b) if attr_mask is None else attr_mask.cpu().float()) * (~drop).float()
            batch["attributes"] = attributes.to(dev, x0.dtype)
            batch["attr_mask"] = keep.to(dev, x0.dtype)
        return batch

    def draw_rows(self, rows: dict, generator: torch.Generator) -> dict:
        return self.draw(rows["x"], rows["labels"], generator, rows.get("attributes"), rows.get("attr_mask"))

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        x0, noise, t = batch["x0"], batch["noise"], batch["t"]
        # alphas_cumprod gathered here (not scheduler.add_noise) so dtype follows x0 in the
        # float64 preflight as well.
        ac = self.scheduler.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t]
        ac = ac.view((-1,) + (1,) * (x0.ndim - 1))
        xt = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        if "attributes" in batch:
            pred = model(xt, t, batch["labels"], batch["attributes"], batch["attr_mask"])
        else:
            pred = model(xt, t, batch["labels"])
        return (pred - regression_target(self.spec.prediction_type, x0, noise, ac)).pow(2).flatten(1).mean(1)

    def random_batch(self, image_shape: tuple[int, ...], num_classes: int, n: int, generator: torch.Generator) -> dict:
        """Random data of the private data's shape, for the preflight (spends no privacy)."""
        x0 = torch.rand((n, *image_shape), generator=generator) * 2 - 1
        cond = _random_condition(n, num_classes, self.n_attributes, generator)
        batch = self.draw(x0, cond["labels"], generator, cond.get("attributes"), cond.get("attr_mask"))
        batch["labels"] = cond["labels"]  # keep the null label in the mix too
        if self.n_attributes:
            batch["attr_mask"] = cond["attr_mask"]
        return batch

    def preflight_batch(self, n: int, generator: torch.Generator) -> dict:
        return self.random_batch(tuple(self.spec.image_shape), self.spec.num_classes, n, generator)


class AutoencoderObjective:
    """Per-row VAE loss (L1 or MSE + kl_weight * KL) with the posterior noise drawn from the generator."""

    def __init__(self, spec: AutoencoderSpec, kl_weight: float, reconstruction: str = "l1"):
        self.spec = spec
        self.kl_weight = kl_weight
        self.reconstruction = reconstruction
        self.latent_shape = latent_shape(spec)

    def draw_rows(self, rows: dict, generator: torch.Generator) -> dict:
        x = rows["x"]
        eps = torch.randn((x.shape[0], *self.latent_shape), generator=generator)
        return {"x": x, "eps": eps.to(x.device, x.dtype)}

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return autoencoder_loss_rows(model, batch["x"], batch["eps"], self.kl_weight, self.reconstruction)

    def preflight_batch(self, n: int, generator: torch.Generator) -> dict:
        x = torch.rand((n, *self.spec.image_shape), generator=generator) * 2 - 1
        return self.draw_rows({"x": x}, generator)


def discriminator_rows(d: nn.Module, x: torch.Tensor, batch: dict) -> torch.Tensor:
    return d(x, batch["labels"], batch.get("attributes"), batch.get("attr_mask"))


class DiscriminatorObjective:
    """The private step of a conditional GAN.

    Every real (private) row is paired with one fake row drawn with the same condition; the
    row's loss is softplus(-D(real)) + softplus(D(fake)) (non-saturating logistic loss), so the
    fake's gradient is part of the same per-unit gradient and is clipped with it. Fakes carry
    no private information of their own; clipping them with the real row keeps the
    sensitivity of a step at one clipped gradient per privacy unit. D runs once on the real
    rows and once on the fakes (Opacus sums the two per-sample gradients of a row); there
    is one backward pass and one optimizer step per privacy step.
    """

    def __init__(self, generator_model: nn.Module, spec, private_rows: bool = False):
        self.g = generator_model
        self.spec = spec
        self.private_rows = private_rows  # True in DP fine-tuning: fakes must not mix rows
        self.n_attributes = len(spec.attribute_names)

    @torch.no_grad()
    def fakes(self, labels: torch.Tensor, generator: torch.Generator, attributes=None, attr_mask=None,
              dtype=torch.float32) -> torch.Tensor:
        dev = labels.device
        z = torch.randn((labels.shape[0], self.spec.latent_dim), generator=generator).to(dev)
        p = next(self.g.parameters())
        a = None if attributes is None else attributes.to(dev, p.dtype)
        m = None if attr_mask is None else attr_mask.to(dev, p.dtype)
        if self.private_rows and self.g.training:
            # A generator with batch norm in training mode would make each row's fake depend on
            # the labels of the other rows of the batch: one private unit would move the loss of
            # the others, and per-unit clipping would no longer bound a step's sensitivity.
            raise RuntimeError("fakes paired with private rows need the generator in eval mode")
        return self.g(z.to(p.dtype), labels, a, m).to(dtype)

    def draw_rows(self, rows: dict, generator: torch.Generator) -> dict:
        x = rows["x"]
        batch = {"real": x, "labels": rows["labels"]}
        if self.n_attributes:
            b = x.shape[0]
            batch["attributes"] = (rows["attributes"] if rows.get("attributes") is not None
                                   else torch.zeros(b, self.n_attributes, device=x.device)).to(x.dtype)
            batch["attr_mask"] = (rows["attr_mask"] if rows.get("attr_mask") is not None
                                  else torch.zeros(b, device=x.device)).to(x.dtype)
        batch["fake"] = self.fakes(rows["labels"], generator, batch.get("attributes"), batch.get("attr_mask"), x.dtype)
        return batch

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return F.softplus(-discriminator_rows(model, batch["real"], batch)) + \
            F.softplus(discriminator_rows(model, batch["fake"], batch))

    def preflight_batch(self, n: int, generator: torch.Generator) -> dict:
        x = torch.rand((n, *self.spec.image_shape), generator=generator) * 2 - 1
        cond = _random_condition(n, self.spec.num_classes, self.n_attributes, generator)
        return self.draw_rows({"x": x, **cond}, generator)

    def generator_loss(self, d: nn.Module, cond: dict, generator: torch.Generator,
                       mode_seeking: float = 0.0) -> torch.Tensor:
        """Non-saturating generator loss on fresh fakes (gradients flow into G only).

        `mode_seeking` > 0 adds MSGAN's term (Mao et al. 2019): the fakes' second half reuses the
        first half's conditions with other latents, and the generator is penalised by
        mode_seeking / (mean |G(z1) - G(z2)| / mean |z1 - z2|), so two latents that give the
        same image cost it. It reads fakes only: no private data, no privacy cost."""
        labels = cond["labels"]
        n = labels.shape[0]
        if mode_seeking > 0:
            half = n // 2
            cond = {k: torch.cat([v[:half], v[:half], v[2 * half:]]) if torch.is_tensor(v) else v
                    for k, v in cond.items()}
            labels = cond["labels"]
        z = torch.randn((n, self.spec.latent_dim), generator=generator).to(labels.device)
        fake = self.g(z, labels, cond.get("attributes"), cond.get("attr_mask"))
        loss = F.softplus(-discriminator_rows(d, fake, cond)).mean()
        if mode_seeking > 0:
            ratio = (fake[:half] - fake[half:2 * half]).abs().mean() / (z[:half] - z[half:2 * half]).abs().mean()
            loss = loss + mode_seeking / (ratio + 1e-5)
        return loss
