"""A generator family's DP-SGD job: the one DP-SGD loop plus the run directory around it.

A family hands `run_dp_job` a `DPJob`: the module DP-SGD trains (a diffusion UNet, an
autoencoder, a GAN discriminator), its objective (draw_rows / loss / preflight_batch), the
private rows, and the plan already registered in the ledger. The job then

1. builds `dpgen.privacy.dpsgd.DPSGDLoop` (Opacus' validator, contiguous conv inputs, the
   per-sample-gradient preflight, logged in the ledger; it refuses to train if it fails);
2. runs the steps from the last checkpoint: secret Poisson sample of privacy units ->
   physical chunks -> clipped per-unit gradients + noise, with a checkpoint, a ledger progress
   line and the per-step sampled counts (internal/, never released) every `checkpoint_every`
   steps (resumable, each step a function of the secret seed and the step);
3. recomputes the spent epsilon of everything released from the ledger, refuses to finish if
   it exceeds the run's budget, and writes the completion entry and the reconstruction bound
   of the composition of every release mechanism so far.

The order of events leaves the run directory consistent if the process dies at any point.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dpgen.distributed import barrier, broadcast_int, broadcast_parameters, check_in_sync, world
from dpgen.privacy import accounting, mechanisms
from dpgen.privacy.bounds import rero_bound, rero_bound_events
from dpgen.privacy.dpsgd import DPSGDLoop, DPSGDPlan, plan_dpsgd
from dpgen.privacy.engine import PrivacyError, PrivacyUnits
from dpgen.privacy.ledger import PrivacyLedger
from dpgen.privacy.randomness import DP_SECRET, SecretStreams, read_secret
from dpgen.privacy.schema import (
    CompleteEntry, GaussianEvent, PlanEntry, PoissonGaussianEvent, PreflightEntry, ProgressEntry, ReleaseEntry,
)
from dpgen.rundir import RunDir
from dpgen.training.common import EMA, Part, TBLogger, load_state, save_state, state_extra
from dpgen.training.loop import run_steps

MECHANISM = mechanisms.FINETUNE
AE_MECHANISM = mechanisms.AUTOENCODER


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


def run_secret(rd: RunDir, stream: str = "") -> SecretStreams:
    """The secret streams of the run's DP mechanisms (the seed lives only in internal/).

    In a distributed run rank 0 reads the seed and sends it to the other ranks over the
    process group, so every rank draws the same Poisson sample without the seed being
    written anywhere else."""
    seed = read_secret(rd.internal, DP_SECRET) if world().is_main else 0
    return SecretStreams(broadcast_int(seed), stream)


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


def plan_mechanism(config, settings: DPSettings, units: PrivacyUnits, *, mechanism: str, budget: float,
                   other_events: list[dict], trains: str, **more) -> PlanEntry:
    """The ledger plan of one release mechanism: sigma calibrated so that it composed with
    `other_events` spends at most `budget`; `target_epsilon` is the run's one budget."""
    pv = config.privacy
    if pv.neighbouring == "add_remove" and pv.public_unit_count is None and not math.isinf(budget):
        raise PrivacyError(
            f"{mechanism}: privacy.neighbouring add_remove keeps the number of units N secret, so the sample rate "
            f"cannot be batch/N (a data set with one more unit would run another mechanism): set "
            f"privacy.public_unit_count to a figure you can publish (your data has {len(units)} "
            f"{units.kind.removeprefix('per ')}s), or use privacy.neighbouring: replace_one if N is public")
    plan = plan_dpsgd(target_epsilon=budget, delta=pv.delta, n_units=len(units), batch_size=settings.batch_size,
                      steps=settings.steps, max_grad_norm=settings.max_grad_norm,
                      noise_multiplicity=settings.noise_multiplicity, other_events=other_events,
                      accountant=pv.accountant, neighbouring=pv.neighbouring, what=mechanism,
                      unit_kind=units.kind.removeprefix("per "), rate_units=pv.public_unit_count)
    return PlanEntry(
        mechanism=mechanism, scope=mechanisms.scope_of(mechanism), trains=trains, unit=units.kind, n_units=len(units),
        target_epsilon=pv.epsilon, delta=pv.delta, neighbouring=pv.neighbouring, sigma=plan.sigma,
        sample_rate=plan.sample_rate, expected_batch_size=settings.batch_size, planned_steps=settings.steps,
        max_grad_norm=settings.max_grad_norm, noise_multiplicity=settings.noise_multiplicity,
        accountant=pv.accountant, epsilon_planned_pld=plan.epsilon_pld, epsilon_planned_rdp=plan.epsilon_rdp,
        other_events=list(plan.other_events), grad_sample_mode=settings.grad_sample_mode,
        public_unit_count=pv.public_unit_count, **more,
    )


_SAME_PLAN = ("unit", "n_units", "public_unit_count", "target_epsilon", "delta", "neighbouring", "sample_rate",
              "planned_steps", "max_grad_norm", "noise_multiplicity", "accountant")


def register_plan(ledger: PrivacyLedger, plan: PlanEntry) -> PlanEntry:
    """Append the plan once; a resumed run must present the same plan and continues the old one."""
    old = ledger.latest("dp_plan", mechanism=plan.mechanism)
    if old is None:
        return PlanEntry.model_validate(ledger.append(plan))
    old = PlanEntry.model_validate(old)
    changed = [k for k in _SAME_PLAN if getattr(old, k) != getattr(plan, k)]
    if changed:
        raise PrivacyError(
            f"the ledger already holds a different plan for {plan.mechanism} "
            f"({', '.join(f'{k}: {getattr(old, k)} -> {getattr(plan, k)}' for k in changed)}); "
            f"a run directory's privacy plan cannot change once training has started"
        )
    return old


def loop_plan(entry: PlanEntry) -> DPSGDPlan:
    """What the DP-SGD loop runs with, from the registered plan (on resume: the old sigma)."""
    return DPSGDPlan(sigma=entry.sigma, sample_rate=entry.sample_rate, steps=entry.planned_steps,
                     max_grad_norm=entry.max_grad_norm, n_units=entry.n_units,
                     batch_size=int(round(entry.expected_batch_size)), delta=entry.delta,
                     neighbouring=entry.neighbouring, noise_multiplicity=entry.noise_multiplicity,
                     other_events=tuple(e.model_dump() for e in entry.other_events),
                     epsilon_pld=entry.epsilon_planned_pld, epsilon_rdp=entry.epsilon_planned_rdp,
                     rate_units=entry.public_unit_count)


def register_finetune_plan(config, ledger: PrivacyLedger, units: PrivacyUnits, *, other_events: list[dict],
                           trains: str, trainable: dict) -> tuple[DPSettings, PlanEntry]:
    """The main fine-tuning mechanism's settings and plan (registered once in the ledger)."""
    settings = DPSettings.from_finetune(config.finetune)
    plan = register_plan(ledger, plan_mechanism(
        config, settings, units, mechanism=MECHANISM, budget=config.privacy.epsilon,
        other_events=other_events, trains=trains, trainable=trainable,
    ))
    return settings, plan


def spent_epsilon(ledger: PrivacyLedger, config, accountant: str = "pld", pending=()) -> float:
    """Epsilon of everything released so far (with `pending` entries counted as if appended),
    for the run's neighbouring relation."""
    pv = config.privacy
    if accountant == "rdp" and pv.neighbouring != "add_remove":
        return math.nan
    return accounting.epsilon(ledger.events(pending), pv.delta, accountant, pv.neighbouring)


def release_histogram_once(config, rd: RunDir, ledger: PrivacyLedger, labels: np.ndarray, units: PrivacyUnits,
                           num_classes: int, attributes: torch.Tensor | None = None) -> None:
    """The DP label (and attribute) histograms, released once (their cost is already in the plan).
    Runs on rank 0 only (it reads the secret seed itself)."""
    secret = SecretStreams(read_secret(rd.internal, DP_SECRET))
    a = config.sample.attributes
    if a.mode == "dp_histogram" and attributes is not None and not ledger.latest("dp_release",
                                                                                 name=mechanisms.ATTRIBUTE_HISTOGRAM):
        hist = mechanisms.release_attribute_histogram(attributes, units, a.bins, a.histogram_sigma,
                                                      secret.extra("attribute-histogram"))
        ledger.append(ReleaseEntry(
            name=mechanisms.ATTRIBUTE_HISTOGRAM, values=hist.tolist(), event=_attribute_histogram_event(config),
            unit=units.kind, attributes=list(config.data.attributes), bins=a.bins,
            ranges=[[r.min, r.max] for r in config.data.attributes.values()],
            note="Gaussian mechanism on per-unit bin fractions of each attribute (L2 sensitivity sqrt(#attributes))",
        ))
    if config.sample.class_counts.mode != "dp_histogram" or ledger.latest("dp_release", name=mechanisms.LABEL_HISTOGRAM):
        return
    sigma = config.sample.class_counts.histogram_sigma
    hist = mechanisms.release_label_histogram(labels, units, num_classes, sigma, secret.extra("histogram"))
    ledger.append(ReleaseEntry(
        name=mechanisms.LABEL_HISTOGRAM, values=hist.tolist(), event=GaussianEvent(sigma=sigma, count=1),
        unit=units.kind, note="Gaussian mechanism on per-unit label fractions (L2 sensitivity 1)",
    ))


@dataclass
class DPJob:
    mechanism: str
    module: nn.Module  # what DP-SGD trains; its trainable parameters get clipped, noised updates
    objective: Any  # draw_rows / loss / preflight_batch
    rows: dict[str, torch.Tensor]  # private data, one entry per dataset row
    settings: DPSettings
    plan: PlanEntry
    state_path: Path
    # Non-private parts checkpointed with the job (a GAN generator: its updates read only D).
    extra_parts: dict[str, Part] = field(default_factory=dict)
    # Called after each privacy step with (step, loop); e.g. the GAN generator update.
    after_step: Callable[[int, DPSGDLoop], None] | None = None
    stream: str = ""  # prefix of this job's secret streams ("" for the main mechanism)
    log_name: str = "finetune"
    # Reuse this module object's passed preflight from an earlier job in this process (a
    # federated site's rounds; see DPSGDLoop.reuse_preflight).
    reuse_preflight: bool = False


class SampledCounts:
    """How many units each step sampled: private (with q it would reveal N), so it is kept in
    internal/ only. Written at checkpoints; a resumed run rewrites the steps it recomputes."""

    def __init__(self, rd: RunDir, mechanism: str):
        self.path = rd.internal / "sampling" / f"{mechanism.replace(':', '_')}.jsonl"
        self.pending: list[tuple[int, int]] = []

    def add(self, step: int, n: int) -> None:
        self.pending.append((step, n))

    def flush(self) -> None:
        if not self.pending or not world().is_main:
            self.pending = []
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps({"step": s, "units_sampled": n}) + "\n" for s, n in self.pending))
        self.pending = []

    @staticmethod
    def read(path: Path) -> dict[int, int]:
        """step -> units sampled (the last record of a step wins)."""
        out = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    out[int(r["step"])] = int(r["units_sampled"])
        return out


def run_dp_job(config, rd: RunDir, ledger: PrivacyLedger, job: DPJob, units: PrivacyUnits, device,
               progress: bool = True, before_steps: Callable[[], None] | None = None, *,
               first_step: int = 0, last_step: int | None = None, start_key: str | None = None,
               complete: bool = True) -> dict:
    """Preflight, DP-SGD steps, ledger. Returns {"ema", "report", "complete", "final_loss", "resumed_from", ...}.

    By default the job runs its whole plan (steps 0 .. planned_steps), resuming from its state
    file. A part of a registered plan (a federated site's round) is steps `first_step` ..
    `last_step` from the weights the job's module holds now (a fresh optimizer), with
    `start_key` naming those weights: the state file is resumed only if it was written for the
    same part and key, else the part starts over from the module. Step i is the plan's step i
    (its Poisson sample, draws and noise are the run's secret streams at i), and progress
    entries carry the cumulative event of all steps up to the last one done. `complete=False`
    leaves the mechanism open: no completion or bound entry (`complete_mechanism` writes them
    when the whole plan is over); the spent epsilon is still checked against the budget.
    """
    s, pv, entry = job.settings, config.privacy, job.plan
    plan = loop_plan(entry)
    last_step = entry.planned_steps if last_step is None else int(last_step)
    if not 0 <= first_step < last_step <= entry.planned_steps:
        raise PrivacyError(f"{job.mechanism}: steps {first_step}..{last_step} are not a part of the plan's "
                           f"{entry.planned_steps} steps")
    part = None if (first_step, last_step, start_key) == (0, entry.planned_steps, None) else \
        {"first_step": first_step, "last_step": last_step, "key": start_key}
    w = world()
    trainable = [p for p in job.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=s.lr, weight_decay=0.0)

    def log_preflight(report) -> None:
        ledger.append(PreflightEntry(mechanism=job.mechanism, trains=entry.trains, **report.to_dict()))

    loop = DPSGDLoop(job.module, optimizer, job.objective, job.rows, units, plan, run_secret(rd, job.stream),
                     physical_batch_size=s.physical_batch_size, grad_sample_mode=s.grad_sample_mode, device=device,
                     preflight_seed=config.seed, on_preflight=log_preflight, reuse_preflight=job.reuse_preflight)
    if before_steps is not None and w.is_main:
        before_steps()

    module = job.module
    ema = EMA(module, s.ema_decay)
    parts = {"": (module, ema, optimizer), **job.extra_parts}
    start = first_step
    if job.state_path.is_file() and state_extra(job.state_path).get("part") == part:
        start = load_state(job.state_path, parts)[0]
    # Training curves on private batches are not DP: they live in internal/.
    logger = TBLogger(rd.internal / "logs" / job.log_name)
    counts = SampledCounts(rd, job.mechanism)

    def record_progress(done: int) -> None:
        last = ledger.latest("dp_progress", mechanism=job.mechanism)
        if last is not None and last["steps_done"] >= done:
            return
        ledger.append(ProgressEntry(mechanism=job.mechanism, steps_done=done, event=PoissonGaussianEvent(
            **plan.event(done)), epsilon_pld=plan.epsilon(done), delta=pv.delta))

    if start:
        record_progress(start)  # the checkpoint may be newer than the last ledger line

    def step_fn(step: int) -> float:
        stats = loop.step(step)
        if job.after_step is not None:
            job.after_step(step, loop)
            for part, _, _ in job.extra_parts.values():
                broadcast_parameters(part)  # non-private parts updated per rank: keep rank 0's
        ema.update(module)
        counts.add(step, stats.units_sampled)
        return stats.loss

    def checkpoint(done: int) -> None:
        if w.distributed:
            check_in_sync(module, f"{job.mechanism} step {done}")
        if w.is_main:  # in a distributed run rank 0 writes
            save_state(job.state_path, parts, done, {"part": part} if part else None)
            counts.flush()
            record_progress(done)

    try:
        last_loss = run_steps(
            start=start, total=last_step, step_fn=step_fn, checkpoint_fn=checkpoint,
            checkpoint_every=s.checkpoint_every, desc=f"{job.log_name} (DP)", log_fn=logger.scalar,
            progress=progress and w.is_main,
        )
    finally:
        logger.close()
        loop.close()  # the module without Opacus' hooks, even after an error (a caller may train it again)
    digests = None
    if w.distributed:
        digests = check_in_sync(module, f"{job.mechanism} end")
        barrier()  # rank 0's last ledger line is written before any rank reads the spent epsilon

    if complete:
        done = complete_mechanism(config, ledger, entry, units, last_step, world_size=w.size)
        eps_pld, eps_rdp = done.epsilon_pld, math.nan if done.epsilon_rdp is None else done.epsilon_rdp
    else:
        done = None
        eps_pld, eps_rdp = _spent_within_budget(ledger, config, plan.sigma)
    return {"ema": ema, "report": loop.preflight_report, "complete": done.model_dump() if done else None,
            "final_loss": last_loss, "resumed_from": start, "epsilon": eps_pld, "epsilon_rdp": eps_rdp,
            "world_size": w.size, "rank_digests": digests, "sigma": plan.sigma, "sample_rate": plan.sample_rate,
            "preflight_reused": loop.preflight_reused}


def _spent_within_budget(ledger: PrivacyLedger, config, sigma: float, pending=()) -> tuple[float, float]:
    """(PLD, RDP) epsilon of everything released so far (and `pending`, entries about to be
    appended); PrivacyError if over the run's budget."""
    if sigma == 0:
        eps_pld = eps_rdp = math.inf
    else:
        eps_pld, eps_rdp = spent_epsilon(ledger, config, pending=pending), spent_epsilon(ledger, config, "rdp", pending)
    if eps_pld > config.privacy.epsilon * (1 + 1e-9):
        raise PrivacyError(f"spent epsilon {eps_pld:.4f} exceeds the budget {config.privacy.epsilon}; "
                           f"weights not released")
    return eps_pld, eps_rdp


def complete_mechanism(config, ledger: PrivacyLedger, entry: PlanEntry, units: PrivacyUnits, steps_done: int,
                       world_size: int = 1) -> CompleteEntry:
    """Close a DP-SGD mechanism after `steps_done` steps of its plan (all of them, or fewer when
    a federated site stops early): recompute the spent epsilon of everything released from the
    ledger, refuse if it exceeds the run's budget, write the completion entry (once) and the
    reconstruction bound of the composition of every release mechanism so far."""
    pv, plan = config.privacy, loop_plan(entry)
    non_private = plan.sigma == 0
    old = ledger.latest("dp_complete", mechanism=entry.mechanism)
    if old is not None:
        _spent_within_budget(ledger, config, plan.sigma)
        done = CompleteEntry.model_validate(old)
    else:
        fields = dict(mechanism=entry.mechanism, steps_done=steps_done,
                      event=PoissonGaussianEvent(**plan.event(steps_done)), sigma=plan.sigma,
                      sample_rate=plan.sample_rate, max_grad_norm=plan.max_grad_norm, unit=units.kind, delta=pv.delta,
                      target_epsilon=pv.epsilon, world_size=world_size)
        # the epsilon of everything released, this mechanism counted at `steps_done` steps
        eps_pld, eps_rdp = _spent_within_budget(ledger, config, plan.sigma, [CompleteEntry(**fields)])
        done = CompleteEntry(**fields, epsilon_pld=eps_pld, epsilon_rdp=None if math.isnan(eps_rdp) else eps_rdp)
        ledger.append(done)
    if not non_private:
        record_composed_bound(ledger, units, pv.neighbouring)
    return done


def record_composed_bound(ledger: PrivacyLedger, units: PrivacyUnits, neighbouring: str) -> None:
    """Reconstruction robustness of everything released so far (every release mechanism
    composed), at the prior kappa = 1/N (one record guessed at random). Written when a
    mechanism completes; the latest entry covers the whole run."""
    events = ledger.events()
    s = ledger.summary()
    names = sorted({n for n, m in s.mechanisms.items() if m.scope == "release" and m.steps_done > 0}
                   | {r.name for r in s.releases})  # what ran so far, not what is only planned
    last = ledger.latest("bound")
    if last is not None and sorted(last.get("mechanisms") or []) == names:
        return
    kappa = 1.0 / len(units)
    tight = rero_bound_events(events, kappa, neighbouring=neighbouring)
    gdp = None
    dpsgd = [e for e in events if e["type"] == "poisson_gaussian"]
    if len(events) == 1 and dpsgd and neighbouring == "add_remove":  # the CLT closed form is for one DP-SGD run
        gdp = rero_bound(dpsgd[0]["sigma"], dpsgd[0]["sample_rate"], dpsgd[0]["steps"], kappa, method="gdp")
    ledger.append({"kind": "bound", "mechanisms": names, "unit": units.kind, "bound": tight, "bound_gdp": gdp})


__all__ = ["AE_MECHANISM", "MECHANISM", "DPJob", "DPSettings", "SampledCounts", "complete_mechanism", "dp_event",
           "histogram_events",
           "loop_plan", "plan_mechanism", "record_composed_bound", "register_finetune_plan", "register_plan",
           "release_histogram_once", "run_dp_job", "run_secret", "spent_epsilon"]
