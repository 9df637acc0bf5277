"""Membership inference against a diffusion model: loss (denoising-error) attacks.

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

GANs: `discriminator_attack` scores with a discriminator's output (internal use only: the
discriminator of a DP GAN is trained on private data and is not released). dpgen's generators
are diffusion models so far, so the audit stage reports it as not applicable.
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
                device="cpu", progress=False, null_label: int | None = None, name: str = "") -> ScoredModel:
    num_t = len(alphas_cumprod)
    ts = attack_timesteps(num_t, options.timestep_fractions)
    noise = fixed_noise(tuple(members_x.shape[1:]), ts, options.draws, options.seed)
    kw = dict(timesteps=ts, noise=noise, alphas_cumprod=alphas_cumprod, batch_size=options.batch_size, device=device,
              progress=progress, null_label=None if options.use_labels else null_label)
    sm = ScoredModel(
        members=denoising_errors(model, members_x, members_y, desc=f"{name} members", **kw),
        non_members=denoising_errors(model, non_x, non_y, desc=f"{name} non-members", **kw), timesteps=ts)
    if reference is not None:
        sm.ref_members = denoising_errors(reference, members_x, members_y, desc=f"{name} members (reference)", **kw)
        sm.ref_non_members = denoising_errors(reference, non_x, non_y, desc=f"{name} non-members (reference)", **kw)
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


def attack_results(sm: ScoredModel, options: LossAttackOptions) -> dict:
    """AUC and TPR at low FPR (with bootstrap intervals) of the loss and reference scores.

    Scores: "loss" = -mean_t log e(x, t); "reference" = mean_t [log e_ref(x, t) - log e(x, t)].
    """
    out: dict = {"timesteps": sm.timesteps, "draws": sm.members.shape[2], "scores": {}}
    per_t = [_scores(sm, i) for i in range(len(sm.timesteps))]
    for name, (m, n) in _scores(sm).items():
        res = attack_metrics(m.numpy(), n.numpy(), n_boot=options.n_boot, seed=options.seed)
        # Per-timestep AUCs: descriptive only (choosing the best one after the fact is optimistic).
        res["auc_per_timestep"] = {str(t): auc(per_t[i][name][0].numpy(), per_t[i][name][1].numpy())
                                   for i, t in enumerate(sm.timesteps)}
        out["scores"][name] = res
    out["primary"] = "reference" if "reference" in out["scores"] else "loss"
    return out


def raw_scores(sm: ScoredModel) -> dict:
    """Per-image scores (internal only) for the ROC figure."""
    return {name: {"members": m.tolist(), "non_members": n.tolist()} for name, (m, n) in _scores(sm).items()}


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


def overfit_model(pretrained: nn.Module, x: torch.Tensor, y: torch.Tensor, options: OverfitOptions,
                  cond_drop_prob: float = 0.1, device="cpu", progress: bool = False) -> tuple[nn.Module, dict]:
    """A NON-DP fine-tune of `pretrained` on (x, y) with plain Adam: the memorizing control.

    Internal only: its weights are trained on private data without any privacy and are never
    written to disk.
    """
    from dpgen.training.objectives import DiffusionObjective

    device = torch.device(device)
    model = copy.deepcopy(pretrained).to(device).train()
    obj = DiffusionObjective(model, cond_drop_prob)
    opt = torch.optim.Adam(model.parameters(), lr=options.lr)
    n = len(x)
    t0 = time.time()
    loss_v = float("nan")
    bar = tqdm(total=options.steps, desc="overfit control (no DP)", disable=not progress, dynamic_ncols=True, leave=False)
    for step in range(options.steps):
        g = step_generator(options.seed, step, "overfit")
        rows = torch.randperm(n, generator=g)[:options.batch_size]
        batch = obj.draw(x[rows].to(device), y[rows].to(device), g)
        loss = obj.loss(model, batch).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_v = loss.item()
        bar.update(1)
    bar.close()
    model.eval()
    return model, {"steps": options.steps, "n_images": n, "final_loss": loss_v, "seconds": round(time.time() - t0, 1)}


# ----------------------------------------------------------------------------- GANs


@torch.no_grad()
def discriminator_attack(discriminator: nn.Module, members: torch.Tensor, non_members: torch.Tensor,
                         labels_m: torch.Tensor | None = None, labels_n: torch.Tensor | None = None,
                         batch_size: int = 256, n_boot: int = 1000, seed: int = 0) -> dict:
    """Score = the discriminator's "real" logit (members look more real to a memorizing D).

    Internal only: the discriminator of a private GAN is fitted to the private data.
    """
    discriminator.eval()

    def scores(x, y):
        out = []
        for s in range(0, len(x), batch_size):
            args = (x[s:s + batch_size],) if y is None else (x[s:s + batch_size], y[s:s + batch_size])
            out.append(discriminator(*args).reshape(len(args[0]), -1).mean(1).double())
        return torch.cat(out).numpy()

    return attack_metrics(scores(members, labels_m), scores(non_members, labels_n), n_boot=n_boot, seed=seed)


def equal_size(n_members: int, n_non: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of equal-size member and non-member sets (random subsets of the larger side)."""
    n = min(n_members, n_non)
    rng = np.random.default_rng(seed)
    m = np.sort(rng.permutation(n_members)[:n]) if n_members > n else np.arange(n_members)
    k = np.sort(rng.permutation(n_non)[:n]) if n_non > n else np.arange(n_non)
    return m, k


__all__ = ["LossAttackOptions", "OverfitOptions", "attack_timesteps", "fixed_noise", "denoising_errors", "score_model",
           "attack_results", "raw_scores", "overfit_model", "discriminator_attack", "equal_size"]
