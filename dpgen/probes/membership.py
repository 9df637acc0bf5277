"""Membership inference: denoising-loss attacks (diffusion, in pixel or latent space) and
discriminator-score attacks (cGAN).

The idea behind SecMI (Duan et al. 2023) and PIA (Kong et al. 2024): a diffusion model denoises
its training images better than images it never saw. The attack measures each image's
denoising error at a few timesteps,

    e(x, t) = mean over draws j of || eps_theta(sqrt(a_t) x + sqrt(1 - a_t) n_tj, t, y) - n_tj ||^2,

with FIXED timesteps and FIXED noise n_tj (the same for every image, members and non-members
alike, so score differences come from the images, not from the noise), and averages the log
errors over the timesteps (raw errors differ by orders of magnitude between small and large t).
Two scores, higher = "member":

- "loss": -mean_t log e(x, t) (the plain loss attack);
- "reference": mean_t [log e_pretrained(x, t) - log e_finetuned(x, t)]. The pretrained model saw
  public data only, so it is a fair per-image calibration (a "reference model" attack, the idea
  of Carlini et al. 2022's LiRA with one reference): it removes how hard an image is to denoise
  in general and keeps what fine-tuning on it changed.

Per-timestep AUCs are reported as well; picking the best of them after the fact is optimistic,
so the headline numbers are the pre-declared averages over all timesteps.

Members are private training images the run fine-tuned on (respecting data.private.max_images);
non-members are private validation images (never trained on); both sets have the same size.

The control that shows the probe can fail: `overfit_control` fine-tunes the same pretrained
model WITHOUT DP (plain Adam) on a tiny private subset for many steps; the same attack must
give it a clearly higher AUC than the DP model.

Latent diffusion: the same attack on the UNet in latent space: each model's images are
encoded by that model's own autoencoder (the run's, which may itself be DP fine-tuned; the
reference's, public) and scaled as in training, then scored with noise of the latent shape.

GANs (`discriminator_attack`): the DP-trained network is the discriminator, and its score of
an image is the natural membership signal (a discriminator that memorized its training
images calls them "real"). Two scores, as above: "discriminator" = D_finetuned(x, y), and
"reference" = D_finetuned(x, y) - D_pretrained(x, y) (the public-only discriminator removes
how real an image looks in general). The discriminator is internal only: it was fitted to the
private data and is never released (the generator, post-processing of it, is).

Every attack gives a `Scores` (per-image scores of members and non-members by score name);
`attack_results` turns it into AUCs and TPRs at low FPR with bootstrap intervals.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dpgen.core.seeding import step_generator
from dpgen.probes.stats import attack_metrics, auc


@dataclass
class LossAttackOptions:
    # Fractions of the schedule's num_train_timesteps. Measured on the tiny model: members and
    # non-members differ most at medium-to-large t (posterior-mean denoising of few images).
    timestep_fractions: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    draws: int = 4  # fixed noise draws per timestep
    batch_size: int = 128
    seed: int = 0
    n_boot: int = 1000
    use_labels: bool = True  # condition on the true label (the attacker knows it; strongest)

    def to_dict(self) -> dict:
        return asdict(self)


def attack_timesteps(num_train_timesteps: int, fractions) -> list[int]:
    return sorted({min(num_train_timesteps - 1, max(0, int(round(f * num_train_timesteps)))) for f in fractions})


def fixed_noise(image_shape, timesteps: list[int], draws: int, seed: int) -> torch.Tensor:
    """(n_t, draws, *image_shape): the same noise for every image scored."""
    g = step_generator(seed, 0, "membership-noise")
    return torch.randn((len(timesteps), draws, *image_shape), generator=g)


@torch.no_grad()
def denoising_errors(model: nn.Module, x0: torch.Tensor, labels: torch.Tensor, timesteps: list[int],
                     noise: torch.Tensor, alphas_cumprod: torch.Tensor, null_label: int | None = None,
                     batch_size: int = 128, device: str | torch.device = "cpu", progress: bool = False,
                     desc: str = "membership") -> torch.Tensor:
    """(N, n_t, draws) denoising errors (the model's training loss: epsilon, v or x0 target, as
    its spec says) of model-range images `x0` (N, C, ...)."""
    from dpgen.models.diffusion import regression_target

    prediction_type = getattr(getattr(model, "spec", None), "prediction_type", "epsilon")
    device = torch.device(device)
    model = model.to(device).eval()
    n, n_t, draws = len(x0), len(timesteps), noise.shape[1]
    out = torch.empty(n, n_t, draws, dtype=torch.float64)
    bar = tqdm(total=n * n_t * draws, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    for s in range(0, n, batch_size):
        x = x0[s:s + batch_size].to(device)
        y = labels[s:s + batch_size].to(device)
        if null_label is not None:
            y = torch.full_like(y, null_label)
        b = len(x)
        shape = (-1,) + (1,) * (x.ndim - 1)
        for i, t in enumerate(timesteps):
            a = alphas_cumprod[t].to(device=device, dtype=x.dtype)
            tt = torch.full((b,), int(t), device=device, dtype=torch.long)
            for j in range(draws):
                eps = noise[i, j].to(device=device, dtype=x.dtype).expand_as(x)
                xt = a.sqrt().view(shape) * x + (1 - a).sqrt().view(shape) * eps
                pred = model(xt, tt, y)
                target = regression_target(prediction_type, x, eps, a.view(shape))
                out[s:s + b, i, j] = (pred - target).pow(2).flatten(1).mean(1).double().cpu()
                bar.update(b)
    bar.close()
    return out


@dataclass
class ScoredModel:
    """Denoising errors of members and non-members under one model (and its reference)."""

    members: torch.Tensor  # (n, n_t, draws)
    non_members: torch.Tensor
    ref_members: torch.Tensor | None = None
    ref_non_members: torch.Tensor | None = None
    timesteps: list[int] = field(default_factory=list)


def score_model(model, reference, alphas_cumprod, members_x, members_y, non_x, non_y, options: LossAttackOptions,
                device="cpu", progress=False, null_label: int | None = None, name: str = "",
                reference_inputs: tuple[torch.Tensor, torch.Tensor] | None = None) -> ScoredModel:
    """Denoising errors of `model` (and `reference`) on members and non-members. The inputs are
    what the UNet denoises (images, or latents); `reference_inputs` = (members, non-members)
    when the reference sees other inputs (latent diffusion: its own autoencoder's latents)."""
    num_t = len(alphas_cumprod)
    ts = attack_timesteps(num_t, options.timestep_fractions)
    noise = fixed_noise(tuple(members_x.shape[1:]), ts, options.draws, options.seed)
    kw = dict(timesteps=ts, noise=noise, alphas_cumprod=alphas_cumprod, batch_size=options.batch_size, device=device,
              progress=progress, null_label=None if options.use_labels else null_label)
    sm = ScoredModel(
        members=denoising_errors(model, members_x, members_y, desc=f"{name} members", **kw),
        non_members=denoising_errors(model, non_x, non_y, desc=f"{name} non-members", **kw), timesteps=ts)
    if reference is not None:
        ref_m, ref_n = reference_inputs if reference_inputs is not None else (members_x, non_x)
        sm.ref_members = denoising_errors(reference, ref_m, members_y, desc=f"{name} members (reference)", **kw)
        sm.ref_non_members = denoising_errors(reference, ref_n, non_y, desc=f"{name} non-members (reference)", **kw)
    return sm


def _log_err(errors: torch.Tensor, t_index: int | None = None) -> torch.Tensor:
    """Per-image log denoising error: mean over draws, log, then mean over timesteps.

    Logs, because raw errors differ by orders of magnitude across timesteps (large at small t,
    tiny at large t): a plain average would be the small-t error alone, where members and
    non-members look alike. On the log scale each timestep counts by its relative difference.
    """
    e = errors.mean(2).clamp_min(1e-12).log()
    return e.mean(1) if t_index is None else e[:, t_index]


def _scores(sm: "ScoredModel", t_index: int | None = None) -> dict:
    out = {"loss": (-_log_err(sm.members, t_index), -_log_err(sm.non_members, t_index))}
    if sm.ref_members is not None:
        out["reference"] = (_log_err(sm.ref_members, t_index) - _log_err(sm.members, t_index),
                            _log_err(sm.ref_non_members, t_index) - _log_err(sm.non_members, t_index))
    return out


@dataclass
class Scores:
    """Per-image membership scores (higher = "member") of members and non-members, by score name.

    `primary` is the score the headline numbers use (declared before looking at results);
    `per_step` holds descriptive breakdowns (diffusion: the same score at each timestep);
    `details` goes into the results as is (e.g. the timesteps and draws)."""

    members: dict[str, np.ndarray]
    non_members: dict[str, np.ndarray]
    primary: str
    per_step: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    details: dict = field(default_factory=dict)


def denoising_scores(sm: ScoredModel) -> Scores:
    """"loss" = -mean_t log e(x, t); "reference" = mean_t [log e_ref(x, t) - log e(x, t)]."""
    per_t = [_scores(sm, i) for i in range(len(sm.timesteps))]
    both = _scores(sm)
    return Scores(
        members={k: m.numpy() for k, (m, _) in both.items()}, non_members={k: n.numpy() for k, (_, n) in both.items()},
        primary="reference" if "reference" in both else "loss",
        per_step={k: {str(t): (per_t[i][k][0].numpy(), per_t[i][k][1].numpy()) for i, t in enumerate(sm.timesteps)}
                  for k in both},
        details={"timesteps": sm.timesteps, "draws": sm.members.shape[2]})


def attack_results(scores: Scores, n_boot: int = 1000, seed: int = 0) -> dict:
    """AUC and TPR at low FPR (with bootstrap intervals) of every score, and which one is primary.
    Per-step AUCs (diffusion: per timestep) are descriptive only: choosing the best one after
    the fact is optimistic."""
    out: dict = {**scores.details, "scores": {}}
    for name, m in scores.members.items():
        res = attack_metrics(m, scores.non_members[name], n_boot=n_boot, seed=seed)
        if name in scores.per_step:
            res["auc_per_timestep"] = {k: auc(a, b) for k, (a, b) in scores.per_step[name].items()}
        out["scores"][name] = res
    out["primary"] = scores.primary
    return out


def raw_scores(scores: Scores) -> dict:
    """Per-image scores (internal only) for the ROC figure."""
    return {name: {"members": m.tolist(), "non_members": scores.non_members[name].tolist()}
            for name, m in scores.members.items()}


# ----------------------------------------------------------------------------- the control


@dataclass
class OverfitOptions:
    # Measured on the tiny test model (8 images, lr 3e-3): AUC 0.75 after 400 steps, 0.95 after 600,
    # 1.0 after 1000. A smaller set memorizes sooner; equal-size member/non-member sets make the
    # interval wide, hence 16 by default.
    n_images: int = 16
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def overfit(module: nn.Module, objective, rows: dict[str, torch.Tensor], options: OverfitOptions, device="cpu",
            progress: bool = False) -> dict:
    """Train `module` in place WITHOUT DP (plain Adam on random minibatches of `rows`, the
    family's own objective): the memorizing control. Internal only: never written to disk."""
    device = torch.device(device)
    module.to(device).train()
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=options.lr)
    n = len(rows["x"])
    t0 = time.time()
    loss_v = float("nan")
    bar = tqdm(total=options.steps, desc="overfit control (no DP)", disable=not progress, dynamic_ncols=True, leave=False)
    for step in range(options.steps):
        g = step_generator(options.seed, step, "overfit")
        idx = torch.randperm(n, generator=g)[:options.batch_size]
        batch = objective.draw_rows({k: v[idx].to(device) for k, v in rows.items()}, g)
        loss = objective.loss(module, batch).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_v = loss.item()
        bar.update(1)
    bar.close()
    module.eval()
    return {"steps": options.steps, "n_images": n, "final_loss": loss_v, "seconds": round(time.time() - t0, 1)}


def overfit_model(pretrained: nn.Module, x: torch.Tensor, y: torch.Tensor, options: OverfitOptions,
                  cond_drop_prob: float = 0.1, device="cpu", progress: bool = False) -> tuple[nn.Module, dict]:
    """A NON-DP fine-tune of a copy of the diffusion UNet `pretrained` on (x, y): images for pixel
    diffusion, latents for latent diffusion."""
    from dpgen.training.objectives import DiffusionObjective

    model = copy.deepcopy(pretrained)
    info = overfit(model, DiffusionObjective(model, cond_drop_prob), {"x": x, "labels": y}, options, device, progress)
    return model, info


# ----------------------------------------------------------------------------- GANs


@torch.no_grad()
def discriminator_scores(discriminator: nn.Module, x: torch.Tensor, labels: torch.Tensor | None = None,
                         batch_size: int = 256, device="cpu") -> np.ndarray:
    """The discriminator's "real" logit of every image (mean over any output map)."""
    device = torch.device(device)
    d = discriminator.to(device).eval()
    out = []
    for s in range(0, len(x), batch_size):
        xb = x[s:s + batch_size].to(device)
        args = (xb,) if labels is None else (xb, labels[s:s + batch_size].to(device))
        out.append(d(*args).reshape(len(xb), -1).mean(1).double().cpu())
    return torch.cat(out).numpy()


def discriminator_attack(discriminator: nn.Module, members: torch.Tensor, non_members: torch.Tensor,
                         labels_m: torch.Tensor | None = None, labels_n: torch.Tensor | None = None,
                         reference: nn.Module | None = None, batch_size: int = 256, device="cpu") -> Scores:
    """Score = the discriminator's "real" logit (members look more real to a memorizing D), and,
    with a `reference` discriminator (the public pretrained one), the logit minus the
    reference's. Internal only: the discriminator of a private GAN is fitted to the private data."""
    kw = {"batch_size": batch_size, "device": device}
    m, n = discriminator_scores(discriminator, members, labels_m, **kw), discriminator_scores(discriminator, non_members, labels_n, **kw)
    members_s, non_s = {"discriminator": m}, {"discriminator": n}
    if reference is not None:
        members_s["reference"] = m - discriminator_scores(reference, members, labels_m, **kw)
        non_s["reference"] = n - discriminator_scores(reference, non_members, labels_n, **kw)
    return Scores(members_s, non_s, primary="reference" if reference is not None else "discriminator")


def equal_size(n_members: int, n_non: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of equal-size member and non-member sets (random subsets of the larger side)."""
    n = min(n_members, n_non)
    rng = np.random.default_rng(seed)
    m = np.sort(rng.permutation(n_members)[:n]) if n_members > n else np.arange(n_members)
    k = np.sort(rng.permutation(n_non)[:n]) if n_non > n else np.arange(n_non)
    return m, k


__all__ = ["LossAttackOptions", "OverfitOptions", "Scores", "attack_timesteps", "fixed_noise", "denoising_errors",
           "score_model", "denoising_scores", "attack_results", "raw_scores", "overfit", "overfit_model",
           "discriminator_scores", "discriminator_attack", "equal_size"]
