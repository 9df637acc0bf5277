"""The one DP-SGD loop: plan -> preflight -> steps.

Every DP-SGD run in dpgen goes through this module: the fine-tuning of a generator
(`dpgen.training.dp`, which adds the ledger, checkpoints and resume around it), the
evaluation's DP-SGD classifiers (`dpgen.evaluation.utility`) and the privacy audit
(`dpgen.privacy.audit`, which audits exactly this code). So there is one planner, one
preflight and one step, and an audit of it is an audit of what trains the generators.

1. `plan_dpsgd`: sample rate q = expected batch / N units, the smallest noise multiplier for
   which this mechanism composed with `other_events` stays within the budget, for the stated
   neighbouring relation (PLD accountant, RDP cross-check). Refuses delta >= 1/N.
2. `DPSGDLoop(...)`: checks the module (Opacus' validator, contiguous conv inputs), runs the
   float64 per-sample-gradient preflight against autograd on random inputs of the shape the
   module sees (public randomness, no private data), hands the report to the caller, and
   refuses to train if it failed.
3. `DPSGDLoop.step(step)`: the Poisson sample of privacy units, the per-row draws and the
   noise all come from the mechanism's `SecretStreams` (secret seed); physical chunks never
   split a unit; Opacus clips each unit's gradient (its rows and K draws averaged) and adds
   noise of std sigma * C to the sum, divided by the expected batch size.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

from dpgen.distributed import World, rank_share, world
from dpgen.privacy import accounting
from dpgen.privacy.engine import (
    DPSGD, PreflightReport, PrivacyError, PrivacyUnits, make_conv_inputs_contiguous, preflight, require_preflight,
    validate_model,
)
from dpgen.privacy.randomness import SecretStreams, step_generator

PREFLIGHT_BATCH = 4


class DPObjective(Protocol):
    """What DP-SGD needs of a training objective (see dpgen.training.objectives)."""

    def draw_rows(self, rows: dict, generator: torch.Generator) -> dict: ...  # random inputs of the rows' loss
    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor: ...  # one loss per row, shape (B,)
    def preflight_batch(self, n: int, generator: torch.Generator) -> dict: ...  # random rows of the private shape


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class DPSGDPlan:
    """What one DP-SGD mechanism runs with, and what it was calibrated to spend."""

    sigma: float  # noise multiplier: noise std / clipping norm
    sample_rate: float  # Poisson q = batch_size / rate_units
    steps: int
    max_grad_norm: float
    n_units: int
    batch_size: int  # the configured expected batch
    delta: float
    neighbouring: str = "add_remove"
    noise_multiplicity: int = 1
    other_events: tuple[dict, ...] = ()
    epsilon_pld: float = math.inf  # planned, composed with other_events
    epsilon_rdp: float | None = None
    rate_units: int | None = None  # the public unit count q is computed from (None: n_units)

    @property
    def expected_batch_size(self) -> float:
        """What the clipped sum is divided by: the configured batch, a public constant (the
        realised expected batch q * N differs from it when q comes from a public unit count)."""
        return float(self.batch_size)

    def event(self, steps: int | None = None) -> dict:
        """The accounting event of `steps` steps (default: the planned number)."""
        return {"type": "poisson_gaussian", "sigma": self.sigma, "sample_rate": self.sample_rate,
                "steps": self.steps if steps is None else steps}

    def epsilon(self, steps: int | None = None, accountant: str = "pld") -> float:
        """Epsilon after `steps` steps, composed with the other planned events."""
        if self.sigma == 0:
            return math.inf
        return accounting.epsilon([self.event(steps), *self.other_events], self.delta, accountant, self.neighbouring)


def plan_dpsgd(*, target_epsilon: float, delta: float, n_units: int, batch_size: int, steps: int,
               max_grad_norm: float, noise_multiplicity: int = 1, other_events=(), accountant: str = "pld",
               neighbouring: str = "add_remove", what: str = "DP-SGD", unit_kind: str = "unit",
               rate_units: int | None = None) -> DPSGDPlan:
    """Calibrate sigma so that this mechanism and `other_events` compose to <= target_epsilon.

    The sample rate is q = batch_size / rate_units, `rate_units` being a public unit count
    (privacy.public_unit_count) or, when None, the true n_units: then q and sigma depend on N,
    which only a relation with public N (replace-one) or an internal mechanism may allow.

    Raises PrivacyError (one line, what to change) for a batch larger than the data, no
    steps, or delta >= 1/N (a delta that large allows releasing one unit outright).
    """
    if n_units < 1:
        raise PrivacyError(f"{what}: the private data has no {unit_kind}")
    q = batch_size / (rate_units or n_units)
    if q > 1:
        counted = (f"privacy.public_unit_count = {rate_units}" if rate_units
                   else f"the number of privacy units ({n_units} {unit_kind}s)")
        raise PrivacyError(f"the batch size {batch_size} of {what} is larger than {counted}; lower it")
    if steps < 1:
        raise PrivacyError(f"{what}: a DP-SGD run needs at least one step")
    if delta >= 1.0 / n_units:
        raise PrivacyError(
            f"privacy.delta = {delta:g} is not below 1/N = 1/{n_units} = {1 / n_units:.3g}: with a delta that large a "
            f"mechanism may publish a {unit_kind} outright and still meet the guarantee; use delta well below 1/N "
            f"(e.g. {_suggest_delta(n_units):g})")
    other = tuple(accounting.validate_event(e) for e in other_events)
    if math.isinf(target_epsilon):
        sigma, eps_pld, eps_rdp = 0.0, math.inf, math.inf
    else:
        try:
            sigma = accounting.calibrate_sigma(target_epsilon, delta, q, steps, extra_events=other,
                                               accountant=accountant, neighbouring=neighbouring)
        except ValueError as err:
            raise PrivacyError(f"{what}: {err}") from None
        events = [{"type": "poisson_gaussian", "sigma": sigma, "sample_rate": q, "steps": steps}, *other]
        eps_pld = accounting.epsilon(events, delta, "pld", neighbouring)
        eps_rdp = accounting.epsilon(events, delta, "rdp") if neighbouring == "add_remove" else None
    return DPSGDPlan(sigma=sigma, sample_rate=q, steps=steps, max_grad_norm=max_grad_norm, n_units=n_units,
                     batch_size=batch_size, delta=delta, neighbouring=neighbouring,
                     noise_multiplicity=noise_multiplicity, other_events=other, epsilon_pld=eps_pld,
                     epsilon_rdp=eps_rdp, rate_units=rate_units)


def _suggest_delta(n: int) -> float:
    return 10 ** math.floor(math.log10(0.1 / n))


# ----------------------------------------------------------------------------- preflight


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


def run_preflight(module: nn.Module, objective: DPObjective, mode: str, seed: int, device) -> PreflightReport:
    """The per-sample-gradient preflight on random inputs of the private shape (public
    randomness from `seed`: no private data is touched)."""
    g = step_generator(seed, 0, "preflight")
    batch = objective.preflight_batch(PREFLIGHT_BATCH, g)
    probe, n_perturbed = preflight_copy(module, g)
    report = preflight(probe, objective.loss, {k: v.to(device) if isinstance(v, torch.Tensor) else v
                                              for k, v in batch.items()}, mode=mode)
    report.zero_parameters_perturbed = n_perturbed
    report.input_shapes = {k: list(v.shape[1:]) for k, v in batch.items()
                           if isinstance(v, torch.Tensor) and v.is_floating_point() and v.ndim > 2}
    return report


def _preflight_signature(module: nn.Module, mode: str, device) -> tuple:
    """What decides which per-sample-gradient code runs: the module's layers and the hooks on
    them (a wrapper left behind would show), its trainable parameters (names, shapes, dtypes),
    the mode, the device and whether ghost clipping is on; not the weights' values."""
    layers = tuple((type(m).__qualname__, len(m._forward_pre_hooks), len(m._forward_hooks), len(m._backward_hooks),
                    len(m._backward_pre_hooks), "_conv_forward" in vars(m)) for m in module.modules())
    params = tuple((n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in module.named_parameters())
    from dpgen.privacy import engine

    return mode, str(device), engine.GHOST_CONVS, layers, params


@dataclass(frozen=True)
class _PassedPreflight:
    objective: Any
    signature: tuple
    report: PreflightReport


def _passed_preflight(module: nn.Module, objective: DPObjective, mode: str, device) -> PreflightReport | None:
    """The passed preflight this very module object already had, with this very objective
    object, if nothing that decides the per-sample-gradient code changed since."""
    memo = getattr(module, "_dpgen_passed_preflight", None)
    if (isinstance(memo, _PassedPreflight) and memo.objective is objective and memo.report.passed
            and memo.signature == _preflight_signature(module, mode, device)):
        return memo.report
    return None


# ----------------------------------------------------------------------------- the loop


def sample_units(units: PrivacyUnits, sample_rate: float, secret: SecretStreams, step: int) -> np.ndarray:
    """The units that take part in `step`: each independently with probability q (what the
    accountant assumes), decided by the mechanism's secret randomness."""
    return units.poisson_sample(sample_rate, secret.poisson(step))


@dataclass
class StepStats:
    loss: float
    units_sampled: int  # private: goes to internal/ only


@dataclass
class DPSGDLoop:
    """One DP-SGD mechanism over `rows` (private data, one entry per dataset row), steppable.

    Construction runs the preflight (refusing to train if it fails); `step(i)` runs step i,
    a pure function of the secret streams and i, so a resumed run recomputes exactly.

    `reuse_preflight`: a module object trained by several loops in one process (a federated
    site's rounds: the same module and objective, new weights each round) is preflighted by the
    first loop only; a later loop reuses that passed report as long as the module's layers,
    trainable parameters, mode, device and objective object are the same (the weights' values
    do not decide which per-sample-gradient code runs, see `preflight_copy`). A new process, a
    new module or objective, another mode or trainable selection runs the preflight again.
    """

    module: nn.Module  # what DP-SGD trains (its parameters with requires_grad)
    optimizer: torch.optim.Optimizer
    objective: DPObjective
    rows: dict[str, torch.Tensor]
    units: PrivacyUnits
    plan: DPSGDPlan
    secret: SecretStreams
    physical_batch_size: int
    grad_sample_mode: str = "hooks"
    device: Any = "cpu"
    preflight_seed: int = 0
    # Called with the preflight report before the loop refuses a failed one (to log it).
    on_preflight: Callable[[PreflightReport], None] | None = None
    world: World = field(default_factory=world)
    reuse_preflight: bool = False

    def __post_init__(self) -> None:
        if len(self.units) != self.plan.n_units:
            raise PrivacyError(f"the plan is for {self.plan.n_units} privacy units, the data has {len(self.units)}")
        self.module.to(self.device).train()
        validate_model(self.module)
        make_conv_inputs_contiguous(self.module)
        mode = self.grad_sample_mode
        report = _passed_preflight(self.module, self.objective, mode, self.device) if self.reuse_preflight else None
        self.preflight_reused = report is not None
        if report is None:
            report = run_preflight(self.module, self.objective, mode, self.preflight_seed, self.device)
            if self.reuse_preflight and report.passed:
                self.module._dpgen_passed_preflight = _PassedPreflight(
                    self.objective, _preflight_signature(self.module, mode, self.device), report)
            if self.on_preflight is not None:  # a reused report was logged when it ran
                self.on_preflight(report)
        self.preflight_report = report
        require_preflight(report)
        self.engine = DPSGD(self.module, self.optimizer, noise_multiplier=self.plan.sigma,
                            max_grad_norm=self.plan.max_grad_norm, expected_batch_size=self.plan.expected_batch_size,
                            grad_sample_mode=self.grad_sample_mode)
        self._draws = "" if not self.world.distributed else f"rank{self.world.rank}:"

    def sample(self, step: int) -> np.ndarray:
        return sample_units(self.units, self.plan.sample_rate, self.secret, step)

    def step(self, step: int) -> StepStats:
        chosen = self.sample(step)
        chunks = self.units.physical_chunks(rank_share(chosen, self.world), self.physical_batch_size)

        def make_batch(chunk: int, rows: np.ndarray, k: int) -> dict:
            gen = self.secret.draws(step, f"{self._draws}{chunk}:{k}")
            return self.objective.draw_rows({key: v[rows].to(self.device) for key, v in self.rows.items()}, gen)

        noise_device = next((p.device for p in self.engine.params), torch.device("cpu"))
        loss = self.engine.step(chunks, make_batch, self.objective.loss, self.plan.noise_multiplicity,
                                self.secret.noise(step, noise_device))
        return StepStats(loss=loss, units_sampled=len(chosen))

    @property
    def gsm(self):
        """Opacus' GradSampleModule around the module (e.g. to disable its hooks for a GAN's G update)."""
        return self.engine.gsm

    def close(self) -> nn.Module:
        return self.engine.close()


__all__ = ["DPObjective", "DPSGDLoop", "DPSGDPlan", "PREFLIGHT_BATCH", "StepStats", "plan_dpsgd", "preflight_copy",
           "run_preflight", "sample_units"]
