"""Reconstruction: can an attacker rebuild a private image from a DP-SGD update?

Threat model (the strongest honest-but-curious one, as in Hayes et al. 2023 and Geiping et al.
2020): the attacker knows the model weights, sees ONE update whose batch holds only the target,
knows the target's label, and for the diffusion loss also the timestep and the noise drawn for
it (for the discriminator loss, the fake paired with it). The update is what DP-SGD releases for that batch: the per-sample gradient clipped to norm
C, plus Gaussian noise of standard deviation sigma * C on every coordinate (the division by the
expected batch size is public and changes nothing). "Without noise" is the clipped gradient
alone: that is where the attack has to work, or it is not an attack.

Two attacks, each against (a) a small GroupNorm CNN classifier and (b) the loss of the network
the run's DP-SGD trains (the family's probe adapter, dpgen.probes.adapters, builds it): the
diffusion loss of the UNet; for latent diffusion the same loss on the latent of the image (the
attacker inverts through the frozen encoder, in pixel space); for a cGAN the discriminator's
loss of the image paired with a fake of the same label:

1. gradient inversion (Geiping et al. 2020, "Inverting Gradients"): optimise a dummy image with
   Adam so that its gradient has maximal cosine similarity with the observed update, plus a
   total-variation prior; the known label is used as is. Success is measured by SSIM and NCC
   (Pearson correlation) to the target, and by identification: is the target the candidate most
   correlated with the reconstruction, among N candidates (the target and N - 1 other private
   images)?
2. gradient-matching identification: the informed attacker of the reconstruction-robustness
   bound, who knows the N candidates and picks the one whose clipped gradient g_j best explains
   the update u (the Bayes-optimal rule under Gaussian noise and a uniform prior: argmax_j
   <g_j, u> - |g_j|^2 / 2). Its success rate is directly comparable with the ReRo bound at
   prior kappa = 1 / N. Many trials are cheap: the noise enters only through the projections
   <g_j, z>, which are drawn exactly from N(0, sigma^2 C^2 G G^T) (G = the candidates' clipped
   gradients), without materialising a noise vector of the model's size.

Bounds beside the empirical rates: the attacked release is one Gaussian mechanism (sample rate
1, one step, noise multiplier sigma), whose ReRo bound at kappa = 1/N is
`rero_bound_tight(sigma, 1, 1, 1/N)`; the ledger's bound covers the whole run (all steps, with
subsampling) at its own kappa.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpgen.core.seeding import step_generator


@dataclass
class InversionOptions:
    iterations: int = 300
    lr: float = 0.1
    tv_weight: float = 0.05
    n_candidates: int = 10
    identification_trials: int = 500
    pool_size: int = 64  # private images whose clipped gradients the identification trials draw from
    diffusion_timestep_fraction: float = 0.05
    # Cosine per parameter tensor, averaged (True), or of the whole flattened gradient (Geiping et al.).
    layerwise: bool = True
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class InversionCNN(nn.Module):
    """GroupNorm CNN with a flattened linear head (Geiping et al.'s ConvNet, shrunk).

    The head sees every spatial position, as in most CNN classifiers for small images; no
    BatchNorm (DP-SGD cannot train it), no inplace activations.
    """

    def __init__(self, image_shape: tuple[int, ...], num_classes: int, width: int = 16):
        super().__init__()
        dims = len(image_shape) - 1
        Conv = nn.Conv2d if dims == 2 else nn.Conv3d
        c = image_shape[0]
        self.body = nn.Sequential(
            Conv(c, width, 3, padding=1), nn.GroupNorm(4, width), nn.SiLU(),
            Conv(width, width, 3, stride=2, padding=1), nn.GroupNorm(4, width), nn.SiLU(),
        )
        out = width * math.prod((s + 1) // 2 for s in image_shape[1:])
        self.head = nn.Linear(out, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


# ----------------------------------------------------------------------------- gradients


LossOfImage = Callable[[torch.Tensor], torch.Tensor]  # (1, C, ...) -> scalar loss


def flat_grad(loss: torch.Tensor, params: list[nn.Parameter], create_graph: bool = False) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def clip(g: torch.Tensor, max_norm: float) -> torch.Tensor:
    return g * min(1.0, max_norm / max(g.norm().item(), 1e-12))


def observe(clipped: torch.Tensor, sigma: float, max_norm: float, generator: torch.Generator) -> torch.Tensor:
    """What DP-SGD releases for a batch holding only the target (sigma = 0: no noise)."""
    if sigma <= 0:
        return clipped.clone()
    return clipped + sigma * max_norm * torch.randn(clipped.shape, generator=generator, dtype=clipped.dtype)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    tv = 0.0
    for d in range(2, x.ndim):
        tv = tv + (x.diff(dim=d)).abs().mean()
    return tv


def cosine(g: torch.Tensor, obs: torch.Tensor, seg: torch.Tensor | None, n_seg: int) -> torch.Tensor:
    """Cosine similarity of two flat gradients, whole-vector (seg None) or averaged per tensor."""
    if seg is None:
        return (g * obs).sum() / (g.norm().clamp_min(1e-12) * obs.norm().clamp_min(1e-12))
    z = torch.zeros(n_seg, dtype=g.dtype)
    dot = z.index_add(0, seg, g * obs)
    gg = z.index_add(0, seg, g * g)
    oo = z.index_add(0, seg, obs * obs)
    live = oo > 0
    return (dot[live] / (gg[live].sqrt() * oo[live].sqrt()).clamp_min(1e-12)).mean()


def invert(loss_of_image: LossOfImage, params: list[nn.Parameter], observed: torch.Tensor, shape: tuple[int, ...],
           options: InversionOptions, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """Gradient inversion: (reconstruction in [-1, 1] of shape (1, *shape), final cosine distance)."""
    x = (0.5 * torch.randn((1, *shape), generator=generator)).clamp(-1, 1).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=options.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, options.iterations))
    obs = observed.detach()
    sizes = [p.numel() for p in params]
    # segment id of every coordinate: per-tensor dot products and norms by index_add
    seg = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)) if options.layerwise else None
    rec = float("nan")
    for _ in range(options.iterations):
        g = flat_grad(loss_of_image(x), params, create_graph=True)
        cos = 1 - cosine(g, obs, seg, len(sizes))
        total = cos + options.tv_weight * total_variation(x)
        opt.zero_grad(set_to_none=True)
        x.grad = torch.autograd.grad(total, x)[0]
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(-1, 1)
        rec = cos.item()
    return x.detach(), rec


# ----------------------------------------------------------------------------- scoring


def ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of a (1, ...) image with each of b (M, ...)."""
    a = a.reshape(1, -1).double()
    b = b.reshape(len(b), -1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (b @ a.T).squeeze(1) / (b.norm(dim=1) * a.norm()).clamp_min(1e-12)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """SSIM of two model-range images (torchmetrics; 3D volumes slice by slice is not needed:
    torchmetrics handles (N, C, D, H, W))."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    k = 11 if min(a.shape[2:]) >= 11 else (min(a.shape[2:]) // 2) * 2 - 1
    return float(structural_similarity_index_measure(a.float(), b.float(), data_range=2.0, kernel_size=k))


def gradient_identification(grads: torch.Tensor, sigma: float, max_norm: float, n_candidates: int, trials: int,
                            seed: int) -> dict:
    """Success rate of the Bayes-optimal candidate test on the clipped gradients `grads` (M, d).

    Trial: target i and N - 1 other pool images as candidates; u = g_i + sigma C z. The scores
    <g_j, u> - |g_j|^2 / 2 need only the Gram matrix G G^T and the projections <g_j, z>, which
    are jointly N(0, G G^T): drawn exactly from its eigen-decomposition.
    """
    g = grads.double()
    m = len(g)
    n = min(n_candidates, m)
    gram = g @ g.T
    sq = gram.diagonal()
    evals, evecs = torch.linalg.eigh(gram)
    root = evecs * evals.clamp_min(0).sqrt()  # root @ root.T == gram
    gen = torch.Generator().manual_seed(seed)
    succ = 0
    for _ in range(trials):
        perm = torch.randperm(m, generator=gen)[:n]  # perm[0] is the target
        i = perm[0]
        proj = root @ torch.randn(m, generator=gen, dtype=torch.float64)  # <g_j, z> for every j
        scores = gram[perm, i] + sigma * max_norm * proj[perm] - sq[perm] / 2
        succ += int(scores.argmax().item() == 0)
    from dpgen.probes.stats import wilson_interval

    return {"success_rate": succ / trials, "success_ci": wilson_interval(succ, trials), "trials": trials,
            "n_candidates": n, "prior_kappa": 1 / n}


def attack_bound(sigma: float, n_candidates: int) -> dict | None:
    """ReRo bound of the attacked release (one Gaussian step, sample rate 1) at kappa = 1/N."""
    if sigma <= 0:
        return {"bound": 1.0, "note": "no noise: no bound"}
    from dpgen.privacy.bounds import rero_bound_tight

    b = rero_bound_tight(sigma, 1.0, 1, 1.0 / n_candidates)
    return {"bound": b["bound"], "kappa": b["kappa"], "sigma": sigma, "sample_rate": 1.0, "steps": 1,
            "method": "tight", "tolerance": b["tolerance"]}


# ----------------------------------------------------------------------------- targets


@dataclass
class Target:
    """One model + loss the attack runs against."""

    name: str
    model: nn.Module
    loss_of_image: Callable[[torch.Tensor, int, dict], torch.Tensor]  # (x (1, ...), label, context) -> scalar
    contexts: Callable[[int], dict]  # per-image context (e.g. the known timestep and noise)


def classifier_target(image_shape, num_classes: int, seed: int) -> Target:
    torch.manual_seed(seed)
    model = InversionCNN(tuple(image_shape), num_classes)

    def loss(x, label, ctx):
        return F.cross_entropy(model(x.float()), torch.tensor([label]))

    return Target("classifier", model, loss, lambda i: {})


def diffusion_target(model: nn.Module, alphas_cumprod: torch.Tensor, timestep: int, image_shape, seed: int,
                     encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     name: str = "diffusion_loss") -> Target:
    """The diffusion loss at a known timestep and known noise (drawn per target image).

    `encode` maps an image to what the UNet denoises (latent diffusion: the frozen encoder and
    the latent scale; differentiable, so the inversion runs in pixel space); `image_shape` is
    then the latent shape the noise is drawn in."""
    from dpgen.models.diffusion import regression_target

    model = model.float().eval()  # eval: no dropout; the loss is the training loss of one draw
    a = alphas_cumprod[timestep].float()
    prediction_type = getattr(getattr(model, "spec", None), "prediction_type", "epsilon")

    def ctx(i: int) -> dict:
        g = step_generator(seed, i, "inversion-noise")
        return {"noise": torch.randn((1, *image_shape), generator=g)}

    def loss(x, label, c):
        noise = c["noise"]
        x0 = x.float() if encode is None else encode(x.float())
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = model(xt, torch.tensor([timestep]), torch.tensor([label]))
        return (pred - regression_target(prediction_type, x0, noise, a)).pow(2).mean()

    return Target(f"{name}(t={timestep})", model, loss, ctx)


def discriminator_target(discriminator: nn.Module, generator: nn.Module, latent_dim: int, seed: int) -> Target:
    """The discriminator's per-row DP-SGD loss, softplus(-D(x, y)) + softplus(D(fake, y)), with the
    fake drawn per target image from the generator (known to the attacker, like the noise of
    the diffusion loss; its term does not depend on x but is part of the clipped update)."""
    d, g = discriminator.float().eval(), generator.float().eval()

    def ctx(i: int) -> dict:
        z = torch.randn((1, latent_dim), generator=step_generator(seed, i, "inversion-fake"))
        return {"z": z}

    def loss(x, label, c):
        y = torch.tensor([label])
        with torch.no_grad():
            fake = g(c["z"], y)
        return F.softplus(-d(x.float(), y)).sum() + F.softplus(d(fake, y)).sum()

    return Target("discriminator_loss", d, loss, ctx)


def run_target(target: Target, images: torch.Tensor, labels: torch.Tensor, target_rows: list[int], sigma: float,
               max_norm: float, options: InversionOptions, progress: bool = False) -> tuple[dict, dict]:
    """Inversion of `target_rows` (with and without noise) and gradient identification.

    `images` (model range, (M, C, ...)) hold the targets and the other candidates. Returns
    (aggregate results, per-target internals incl. reconstructions).
    """
    from tqdm.auto import tqdm

    params = [p for p in target.model.parameters() if p.requires_grad]
    shape = tuple(images.shape[1:])
    x_all = images.float()
    # clipped gradients of the identification pool (the targets are part of it)
    pool = list(dict.fromkeys(list(target_rows) + list(range(min(len(x_all), options.pool_size)))))
    grads, norms = [], []
    for i in pool:
        loss = target.loss_of_image(x_all[i:i + 1], int(labels[i]), target.contexts(i))
        g = flat_grad(loss, params).detach()
        norms.append(g.norm().item())
        grads.append(clip(g, max_norm))
    grads = torch.stack(grads)
    conditions = {"no_noise": 0.0, "run_noise": sigma}
    results: dict = {"target": target.name, "n_parameters": sum(p.numel() for p in params),
                     "gradient_norm_median": float(np.median(norms)),
                     "clipped_fraction": float(np.mean([v > max_norm for v in norms])), "conditions": {}}
    internals: dict = {}
    rng = np.random.default_rng(options.seed)
    bar = tqdm(total=len(conditions) * len(target_rows), desc=f"inversion ({target.name})", disable=not progress,
               dynamic_ncols=True, leave=False)
    for cname, s in conditions.items():
        rows = []
        recs = []
        for r_i, row in enumerate(target_rows):
            g_obs = observe(grads[pool.index(row)], s, max_norm, step_generator(options.seed, row, f"obs:{cname}"))
            ctx = target.contexts(row)
            x_hat, cos_d = invert(lambda x: target.loss_of_image(x, int(labels[row]), ctx), params, g_obs, shape,
                                  options, step_generator(options.seed, row, f"init:{cname}"))
            others = [j for j in rng.permutation(len(x_all)) if j != row][:options.n_candidates - 1]
            cand = torch.cat([x_all[row:row + 1], x_all[others]])
            corr = ncc(x_hat, cand)
            rows.append({"ssim": ssim(x_hat, x_all[row:row + 1]), "ncc": float(corr[0]),
                         "identified": bool(corr.argmax().item() == 0), "cosine_distance": cos_d})
            recs.append(x_hat[0])
            bar.update(1)
        n = len(rows)
        ident = sum(r["identified"] for r in rows)
        results["conditions"][cname] = {
            "sigma": s, "max_grad_norm": max_norm, "n_targets": n,
            "ssim_mean": float(np.mean([r["ssim"] for r in rows])), "ssim_max": float(np.max([r["ssim"] for r in rows])),
            "ncc_mean": float(np.mean([r["ncc"] for r in rows])),
            "inversion_identified": ident, "inversion_identification_rate": ident / n,
            "identification_by_gradient": gradient_identification(
                grads, s, max_norm, options.n_candidates, options.identification_trials, options.seed),
        }
        internals[cname] = {"rows": [int(r) for r in target_rows], "per_target": rows, "reconstructions": torch.stack(recs)}
    bar.close()
    results["attack_bound"] = attack_bound(sigma, min(options.n_candidates, len(pool)))
    return results, internals


__all__ = ["InversionOptions", "InversionCNN", "flat_grad", "clip", "observe", "invert", "ncc", "ssim",
           "gradient_identification", "attack_bound", "Target", "classifier_target", "diffusion_target",
           "discriminator_target", "run_target"]
