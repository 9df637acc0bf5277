"""Training objectives, written so that DP-SGD can check and use them.

An objective splits a training step in two: `draw` makes every random input of a batch
(timesteps, noise, dropped labels) from a generator, and `loss` maps a model and such a
batch to one loss per row. The split is what lets the privacy preflight replay the same
rows one at a time, and what makes a step a deterministic function of its seed.
"""

from __future__ import annotations

import torch
from torch import nn

from dpgen.models.diffusion import ConditionalDiffusion, make_train_scheduler


class DiffusionObjective:
    def __init__(self, model: ConditionalDiffusion, cond_drop_prob: float = 0.1):
        self.spec = model.spec
        self.scheduler = make_train_scheduler(model.spec)
        self.cond_drop_prob = cond_drop_prob
        self.null_label = model.null_label

    def draw(self, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> dict:
        b = x0.shape[0]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        drop = torch.rand(b, generator=generator) < self.cond_drop_prob
        labels = torch.where(drop, torch.full_like(labels, self.null_label), labels)
        dev = x0.device
        return {"x0": x0, "labels": labels.to(dev), "t": t.to(dev), "noise": noise.to(dev, x0.dtype)}

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        x0, noise, t = batch["x0"], batch["noise"], batch["t"]
        # alphas_cumprod gathered here (not scheduler.add_noise) so dtype follows x0 in the
        # float64 preflight as well.
        ac = self.scheduler.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t]
        shape = (-1,) + (1,) * (x0.ndim - 1)
        xt = ac.sqrt().view(shape) * x0 + (1 - ac).sqrt().view(shape) * noise
        pred = model(xt, t, batch["labels"])
        return (pred - noise).pow(2).flatten(1).mean(1)

    def random_batch(self, image_shape: tuple[int, ...], num_classes: int, n: int, generator: torch.Generator) -> dict:
        """Random data of the private data's shape, for the preflight (spends no privacy)."""
        x0 = torch.rand((n, *image_shape), generator=generator) * 2 - 1
        labels = torch.randint(0, num_classes + 1, (n,), generator=generator)
        batch = self.draw(x0, labels, generator)
        batch["labels"] = labels  # keep the null label in the mix too
        return batch
