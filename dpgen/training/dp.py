"""The DP-SGD path every generator family shares: plan -> preflight -> steps -> ledger.

A family hands `run_dp_job` a `DPJob`: the module DP-SGD trains (a diffusion UNet, an
autoencoder, a GAN discriminator), its objective (draw / loss / preflight_batch), the private
rows, and the plan already written to the ledger. The job then

1. checks the module (Opacus' validator; every conv input made contiguous);
2. runs the per-sample-gradient preflight on random inputs of the shape the module sees
   (latents for latent diffusion), logs it, and refuses to train if it fails;
3. runs the steps: Poisson sample of privacy units -> physical chunks -> clipped per-unit
   gradients + noise (`dpgen.privacy.engine.DPSGD`), with a checkpoint and a ledger
   progress line every `checkpoint_every` steps (resumable, deterministic per step);
4. recomputes the spent epsilon from the ledger, refuses to release if it exceeds the
   target, and writes the completion entry and the reconstruction bound.

Order of events leaves the run directory consistent if the process dies at any point.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dpgen.distributed import barrier, broadcast_parameters, check_in_sync, rank_share, world
from dpgen.privacy import accounting
from dpgen.privacy.bounds import rero_bound
from dpgen.privacy.engine import (
    DPSGD, PrivacyError, PrivacyUnits, make_conv_inputs_contiguous, new_secret_seed, preflight, require_preflight,
    step_generator, validate_model,
)
from dpgen.privacy.ledger import PrivacyLedger
from dpgen.privacy.mechanisms import release_label_histogram
from dpgen.rundir import RunDir, write_json_atomic
from dpgen.training.common import EMA, Part, TBLogger, load_state, save_state
from dpgen.training.loop import run_steps

MECHANISM = "dp_sgd:finetune"
AE_MECHANISM = "dp_sgd:autoencoder"
PREFLIGHT_BATCH = 4


@dataclass
class DPSettings:
    steps: int
    batch_size: int
    physical_batch_size: int
    lr: float
    max_grad_norm: float
    noise_multiplicity: int = 1
    ema_decay: float = 0.0
    checkpoint_every: int = 50
    grad_sample_mode: str = "hooks"

    @classmethod
    def from_finetune(cls, ft) -> "DPSettings":
        return cls(ft.steps, ft.batch_size, ft.physical_batch_size, ft.lr, ft.max_grad_norm, ft.noise_multiplicity,
                   ft.ema_decay, ft.checkpoint_every, ft.grad_sample_mode)

    @classmethod
    def from_autoencoder(cls, aft, grad_sample_mode: str) -> "DPSettings":
        return cls(aft.steps, aft.batch_size, aft.physical_batch_size, aft.lr, aft.max_grad_norm, 1,
                   aft.ema_decay, aft.checkpoint_every, grad_sample_mode)


def secret_noise_seed(rd: RunDir) -> int:
    """The DP-noise seed lives only in internal/ (knowing it would let anyone remove the noise)."""
    path = rd.internal / "secrets.json"
    secrets = rd.read_json(path) or {}
    if "noise_seed" not in secrets:
        secrets["noise_seed"] = new_secret_seed()
        write_json_atomic(path, secrets)
    return int(secrets["noise_seed"])


def dp_event(sigma: float, q: float, steps: int) -> dict:
    return {"type": "poisson_gaussian", "sigma": sigma, "sample_rate": q, "steps": steps}


def _attribute_histogram_event(config) -> dict:
    a = config.sample.attributes
    # noise std histogram_sigma on a vector of L2 sensitivity sqrt(A): noise multiplier sigma / sqrt(A)
    return {"type": "gaussian", "sigma": a.histogram_sigma / math.sqrt(len(config.data.attributes)), "count": 1}


def histogram_events(config) -> list[dict]:
    """The DP statistics released beside the model (their cost is planned with DP-SGD's)."""
    events = []
    if config.sample.class_counts.mode == "dp_histogram":
        events.append({"type": "gaussian", "sigma": config.sample.class_counts.histogram_sigma, "count": 1})
    if config.sample.attributes.mode == "dp_histogram":
        events.append(_attribute_histogram_event(config))
    return events


def plan_mechanism(config, settings: DPSettings, n_units: int, unit_kind: str, *, mechanism: str,
                   budget: float, other_events: list[dict], trains: str, **more) -> dict:
    """Sample rate q = batch_size / N_units and the smallest sigma for which this mechanism
    composed with `other_events` spends at most `budget` (PLD unless configured)."""
    pv = config.privacy
    q = settings.batch_size / n_units
    if q > 1:
        raise PrivacyError(
            f"the batch size {settings.batch_size} of {mechanism} is larger than the number of privacy units "
            f"({n_units} {unit_kind.removeprefix('per ')}s); lower it"
        )
    if settings.steps < 1:
        raise PrivacyError(f"{mechanism}: a DP-SGD run needs at least one step")
    if math.isinf(pv.epsilon):
        sigma, eps_pld, eps_rdp = 0.0, math.inf, math.inf
    else:
        sigma = accounting.calibrate_sigma(budget, pv.delta, q, settings.steps, extra_events=other_events,
                                           accountant=pv.accountant)
        events = [dp_event(sigma, q, settings.steps), *other_events]
        eps_pld = accounting.epsilon(events, pv.delta, accountant="pld")
        eps_rdp = accounting.epsilon(events, pv.delta, accountant="rdp")
    return {
        "kind": "dp_plan", "mechanism": mechanism, "trains": trains, "unit": unit_kind, "n_units": n_units,
        "target_epsilon": pv.epsilon, "delta": pv.delta, "sigma": sigma, "sample_rate": q,
        "expected_batch_size": settings.batch_size, "planned_steps": settings.steps,
        "max_grad_norm": settings.max_grad_norm, "noise_multiplicity": settings.noise_multiplicity,
        "accountant": pv.accountant, "epsilon_planned_pld": eps_pld, "epsilon_planned_rdp": eps_rdp,
        "other_events": other_events, "poisson_sampling": True, "grad_sample_mode": settings.grad_sample_mode,
        **more,
    }


def _check_same_plan(old: dict, new: dict) -> None:
    keys = ("unit", "n_units", "target_epsilon", "delta", "sample_rate", "planned_steps", "max_grad_norm",
            "noise_multiplicity", "accountant")
    changed = [k for k in keys if old.get(k) != new.get(k)]
    if changed:
        raise PrivacyError(
            f"the ledger already holds a different plan for {new['mechanism']} "
            f"({', '.join(f'{k}: {old.get(k)} -> {new.get(k)}' for k in changed)}); "
            f"a run directory's privacy plan cannot change once training has started"
        )


def register_plan(ledger: PrivacyLedger, plan: dict) -> dict:
    """Append the plan once; a resumed run must present the same plan and continues the old one."""
    old = ledger.latest("dp_plan", mechanism=plan["mechanism"])
    if old is None:
        ledger.append(plan)
        return plan
    _check_same_plan(old, plan)
    return old


def register_finetune_plan(config, ledger: PrivacyLedger, units: PrivacyUnits, *, other_events: list[dict],
                           trains: str, trainable: dict) -> tuple[DPSettings, dict]:
    """The main fine-tuning mechanism's settings and plan (registered once in the ledger)."""
    settings = DPSettings.from_finetune(config.finetune)
    plan = register_plan(ledger, plan_mechanism(
        config, settings, len(units), units.kind, mechanism=MECHANISM, budget=config.privacy.epsilon,
        other_events=other_events, trains=trains, trainable=trainable,
    ))
    return settings, plan


def spent_epsilon(ledger: PrivacyLedger, delta: float, accountant: str) -> float:
    return accounting.epsilon(ledger.events(), delta, accountant=accountant)


def release_attribute_histogram(values: torch.Tensor, units: PrivacyUnits, bins: int, sigma: float,
                                generator: torch.Generator) -> np.ndarray:
    """(A, bins) noisy histograms of attributes normalized to [-1, 1]. Each unit adds the
    fractions of its rows per bin (sum 1 per attribute), so adding or removing a unit moves
    the whole (A x bins) array by at most sqrt(A) in L2; the noise std per bin is `sigma`."""
    v = np.asarray(values, dtype=np.float64)
    idx = np.clip(np.floor((v + 1) / 2 * bins), 0, bins - 1).astype(int)  # (N, A)
    hist = np.zeros((v.shape[1], bins))
    for rows in units.rows_of_unit:
        for j in range(v.shape[1]):
            hist[j] += np.bincount(idx[rows, j], minlength=bins) / len(rows)
    noise = torch.randn(hist.shape, generator=generator, dtype=torch.float64).numpy() * sigma
    return hist + noise


def release_histogram_once(config, rd: RunDir, ledger: PrivacyLedger, labels: np.ndarray, units: PrivacyUnits,
                           num_classes: int, attributes: torch.Tensor | None = None) -> None:
    """The DP label (and attribute) histograms, released once (their cost is already in the plan)."""
    a = config.sample.attributes
    if a.mode == "dp_histogram" and attributes is not None and not ledger.latest("dp_release", name="attribute_histogram"):
        hist = release_attribute_histogram(attributes, units, a.bins, a.histogram_sigma,
                                           step_generator(secret_noise_seed(rd), 0, "attribute-histogram"))
        ledger.append({
            "kind": "dp_release", "name": "attribute_histogram", "values": hist.tolist(),
            "attributes": list(config.data.attributes), "bins": a.bins,
            "ranges": [[r.min, r.max] for r in config.data.attributes.values()],
            "event": _attribute_histogram_event(config), "unit": units.kind,
            "note": "Gaussian mechanism on per-unit bin fractions of each attribute (L2 sensitivity sqrt(#attributes))",
        })
    if config.sample.class_counts.mode != "dp_histogram" or ledger.latest("dp_release", name="label_histogram"):
        return
    sigma = config.sample.class_counts.histogram_sigma
    hist = release_label_histogram(labels, units, num_classes, sigma,
                                   step_generator(secret_noise_seed(rd), 0, "histogram"))
    ledger.append({
        "kind": "dp_release", "name": "label_histogram", "values": hist.tolist(),
        "event": {"type": "gaussian", "sigma": sigma, "count": 1},
        "unit": units.kind, "note": "Gaussian mechanism on per-unit label fractions (L2 sensitivity 1)",
    })


def preflight_copy(module: nn.Module, generator: torch.Generator) -> tuple[nn.Module, int]:
    """A copy of `module` for the preflight in which all-zero parameters (LoRA `up`
    matrices, MONAI's zero-initialised output convolutions before any training) get small
    random values: a zero weight makes every gradient behind it zero, and a check of zeros
    against zeros proves nothing. The values of the weights do not change which per-sample
    gradient code runs, so the check carries over to the real module."""
    probe = copy.deepcopy(module)
    n = 0
    with torch.no_grad():
        for p in probe.parameters():
            if p.numel() and not p.detach().any():
                p.copy_(torch.randn(p.shape, generator=generator).to(p) * 0.02)
                n += 1
    return probe, n


@dataclass
class DPJob:
    mechanism: str
    module: nn.Module  # what DP-SGD trains; its trainable parameters get clipped, noised updates
    objective: Any  # draw_rows / loss / preflight_batch
    rows: dict[str, torch.Tensor]  # private data, one entry per dataset row
    settings: DPSettings
    plan: dict
    state_path: Path
    # Non-private parts checkpointed with the job (a GAN generator: its updates read only D).
    extra_parts: dict[str, Part] = field(default_factory=dict)
    # Called after each privacy step with (step, dp); e.g. the GAN generator update.
    after_step: Callable[[int, DPSGD], None] | None = None
    stream: str = ""  # prefix of this job's random streams ("" for the main mechanism)
    log_name: str = "finetune"


def run_dp_job(config, rd: RunDir, ledger: PrivacyLedger, job: DPJob, units: PrivacyUnits, device,
               progress: bool = True, before_steps: Callable[[], None] | None = None) -> dict:
    """Preflight, DP-SGD steps, ledger. Returns {"ema", "report", "complete", "final_loss", "resumed_from"}."""
    s, pv, plan, module = job.settings, config.privacy, job.plan, job.module
    sigma, q = plan["sigma"], plan["sample_rate"]
    module.to(device).train()
    validate_model(module)
    make_conv_inputs_contiguous(module)

    g = step_generator(config.seed, 0, f"{job.stream}preflight")
    batch = job.objective.preflight_batch(PREFLIGHT_BATCH, g)
    probe, n_perturbed = preflight_copy(module, g)
    report = preflight(probe, job.objective.loss, {k: v.to(device) for k, v in batch.items()}, mode=s.grad_sample_mode)
    del probe
    shapes = {k: list(v.shape[1:]) for k, v in batch.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
              and v.ndim > 2}
    ledger.append({"kind": "preflight", "mechanism": job.mechanism, "trains": plan.get("trains"),
                   "input_shapes": shapes, "zero_parameters_perturbed": n_perturbed, **report.to_dict()})
    require_preflight(report)
    w = world()
    if before_steps is not None and w.is_main:
        before_steps()

    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=s.lr, weight_decay=0.0)
    dp = DPSGD(module, optimizer, noise_multiplier=sigma, max_grad_norm=s.max_grad_norm,
               expected_batch_size=q * len(units), grad_sample_mode=s.grad_sample_mode)
    ema = EMA(module, s.ema_decay)
    parts = {"": (module, ema, optimizer), **job.extra_parts}
    start = load_state(job.state_path, parts)[0] if job.state_path.is_file() else 0
    # Only rank 0 adds noise (DistributedDPOptimizer), so only rank 0 reads the secret seed.
    noise_seed = secret_noise_seed(rd) if w.is_main else 0
    logger = TBLogger(rd.logs / job.log_name)

    def record_progress(done: int) -> None:
        last = ledger.latest("dp_progress", mechanism=job.mechanism)
        if last is not None and last["steps_done"] >= done:
            return
        event = dp_event(sigma, q, done)
        eps = math.inf if sigma == 0 else accounting.epsilon([event, *plan["other_events"]], pv.delta, "pld")
        ledger.append({"kind": "dp_progress", "mechanism": job.mechanism, "steps_done": done, "event": event,
                       "epsilon_pld": eps, "delta": pv.delta})

    if start:
        record_progress(start)  # the checkpoint may be newer than the last ledger line

    def step_fn(step: int) -> float:
        # The same global Poisson sample on every rank; each rank takes its share.
        chosen = units.poisson_sample(q, step_generator(config.seed, step, f"{job.stream}poisson"))
        chunks = units.physical_chunks(rank_share(chosen, w), s.physical_batch_size)
        draws = f"{job.stream}draw:" if not w.distributed else f"{job.stream}draw:rank{w.rank}:"

        def make_batch(chunk: int, rows: np.ndarray, k: int) -> dict:
            gen = step_generator(config.seed, step, f"{draws}{chunk}:{k}")
            return job.objective.draw_rows({key: v[rows].to(device) for key, v in job.rows.items()}, gen)

        loss = dp.step(chunks, make_batch, job.objective.loss, s.noise_multiplicity,
                       step_generator(noise_seed, step, f"{job.stream}noise"))
        if job.after_step is not None:
            job.after_step(step, dp)
            for part, _, _ in job.extra_parts.values():
                broadcast_parameters(part)  # non-private parts updated per rank: keep rank 0's
        ema.update(module)
        logger.scalar(f"{job.log_name}/batch_units", len(chosen), step + 1)
        return loss

    def checkpoint(done: int) -> None:
        if w.distributed:
            check_in_sync(module, f"{job.mechanism} step {done}")
        if w.is_main:  # in a distributed run rank 0 writes
            save_state(job.state_path, parts, done)
            record_progress(done)

    last_loss = run_steps(
        start=start, total=s.steps, step_fn=step_fn, checkpoint_fn=checkpoint, checkpoint_every=s.checkpoint_every,
        desc=f"{job.log_name} (DP)", log_fn=logger.scalar, progress=progress and w.is_main,
    )
    logger.close()
    dp.close()
    digests = None
    if w.distributed:
        digests = check_in_sync(module, f"{job.mechanism} end")
        barrier()  # rank 0's last ledger line is written before any rank reads the spent epsilon

    eps_pld = spent_epsilon(ledger, pv.delta, "pld") if sigma > 0 else math.inf
    eps_rdp = spent_epsilon(ledger, pv.delta, "rdp") if sigma > 0 else math.inf
    if eps_pld > pv.epsilon * (1 + 1e-9):
        raise PrivacyError(f"spent epsilon {eps_pld:.4f} exceeds the target {pv.epsilon}; weights not released")
    complete = {
        "kind": "dp_complete", "mechanism": job.mechanism, "steps_done": s.steps, "event": dp_event(sigma, q, s.steps),
        "sigma": sigma, "sample_rate": q, "max_grad_norm": s.max_grad_norm, "unit": units.kind,
        "epsilon_pld": eps_pld, "epsilon_rdp": eps_rdp, "delta": pv.delta, "target_epsilon": pv.epsilon,
        "world_size": w.size,
    }
    if ledger.latest("dp_complete", mechanism=job.mechanism) is None:
        ledger.append(complete)
    if sigma > 0 and ledger.latest("bound", mechanism=job.mechanism) is None:
        # Reconstruction robustness at the default prior kappa = 1/N (one record guessed at random).
        kappa = 1.0 / len(units)
        entry = {"kind": "bound", "mechanism": job.mechanism, "unit": units.kind,
                 "bound": rero_bound(sigma, q, s.steps, kappa, method="tight"),
                 "bound_gdp": rero_bound(sigma, q, s.steps, kappa, method="gdp")}
        dp_mechanisms = {e["mechanism"] for e in ledger.entries() if e.get("kind") == "dp_plan"}
        if len(dp_mechanisms) > 1:
            entry["scope"] = (f"{job.mechanism} alone; the run has {len(dp_mechanisms)} DP-SGD mechanisms on the same "
                              f"records ({', '.join(sorted(dp_mechanisms))}), whose composed bound is larger")
        ledger.append(entry)
    return {"ema": ema, "report": report, "complete": complete, "final_loss": last_loss, "resumed_from": start,
            "epsilon": eps_pld, "epsilon_rdp": eps_rdp, "world_size": w.size, "rank_digests": digests}
