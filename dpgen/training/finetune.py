"""DP-SGD fine-tuning on the private data, with its privacy plan and ledger.

Order of events (each one leaves the run directory consistent if the process dies):
1. plan: sample rate q = batch_size / N_units, steps T, sigma calibrated so that the
   composition of everything released (DP-SGD + any DP label histogram) stays within the
   target epsilon. The plan is appended to the ledger once; a resumed run re-reads it and
   refuses to continue under a different plan.
2. preflight: Opacus' per-sample gradients vs. autograd on random inputs of the private
   shape; refuse to train if they differ.
3. steps, with a checkpoint (then a ledger progress entry) every `checkpoint_every` steps.
4. completion: the spent epsilon is recomputed from the steps actually taken and checked
   against the target before the weights are written where sampling reads them.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from dpgen.data import DataError, ImageDataset
from dpgen.models import ConditionalDiffusion, DiffusionSpec
from dpgen.privacy import accounting
from dpgen.privacy.bounds import rero_bound
from dpgen.privacy.engine import (
    DPSGD, PrivacyError, PrivacyUnits, make_conv_inputs_contiguous, new_secret_seed, preflight,
    require_preflight, step_generator, validate_model,
)
from dpgen.privacy.ledger import PrivacyLedger
from dpgen.privacy.mechanisms import release_label_histogram
from dpgen.rundir import RunDir, write_json_atomic
from dpgen.training.common import EMA, TBLogger, load_training_state, load_weights, save_training_state, save_weights
from dpgen.training.loop import run_steps
from dpgen.training.objectives import DiffusionObjective
from dpgen.training.pretrain import PRETRAIN_WEIGHTS

FINETUNE_WEIGHTS = "finetune.safetensors"
MECHANISM = "dp_sgd:finetune"
PREFLIGHT_BATCH = 4


def secret_noise_seed(rd: RunDir) -> int:
    """The DP-noise seed lives only in internal/ (knowing it would let anyone remove the noise)."""
    path = rd.internal / "secrets.json"
    secrets = rd.read_json(path) or {}
    if "noise_seed" not in secrets:
        secrets["noise_seed"] = new_secret_seed()
        write_json_atomic(path, secrets)
    return int(secrets["noise_seed"])


def privacy_plan(config, n_units: int, unit_kind: str) -> dict:
    ft, pv = config.finetune, config.privacy
    q = ft.batch_size / n_units
    if q > 1:
        raise PrivacyError(
            f"finetune.batch_size={ft.batch_size} is larger than the number of privacy units ({n_units} "
            f"{unit_kind.removeprefix('per ')}s); lower it"
        )
    extra = []
    if config.sample.class_counts.mode == "dp_histogram":
        extra.append({"type": "gaussian", "sigma": config.sample.class_counts.histogram_sigma, "count": 1})
    if math.isinf(pv.epsilon):
        sigma = 0.0
        eps_pld = eps_rdp = math.inf
    else:
        sigma = accounting.calibrate_sigma(pv.epsilon, pv.delta, q, ft.steps, extra_events=extra, accountant=pv.accountant)
        event = dp_event(sigma, q, ft.steps)
        eps_pld = accounting.epsilon([event, *extra], pv.delta, accountant="pld")
        eps_rdp = accounting.epsilon([event, *extra], pv.delta, accountant="rdp")
    return {
        "kind": "dp_plan", "mechanism": MECHANISM, "unit": unit_kind, "n_units": n_units,
        "target_epsilon": pv.epsilon, "delta": pv.delta, "sigma": sigma, "sample_rate": q,
        "expected_batch_size": ft.batch_size, "planned_steps": ft.steps, "max_grad_norm": ft.max_grad_norm,
        "noise_multiplicity": ft.noise_multiplicity, "accountant": pv.accountant,
        "epsilon_planned_pld": eps_pld, "epsilon_planned_rdp": eps_rdp, "other_events": extra,
        "poisson_sampling": True, "grad_sample_mode": ft.grad_sample_mode,
    }


def dp_event(sigma: float, q: float, steps: int) -> dict:
    return {"type": "poisson_gaussian", "sigma": sigma, "sample_rate": q, "steps": steps}


def _check_same_plan(old: dict, new: dict) -> None:
    keys = ("unit", "n_units", "target_epsilon", "delta", "sample_rate", "planned_steps", "max_grad_norm",
            "noise_multiplicity", "accountant")
    changed = [k for k in keys if old.get(k) != new.get(k)]
    if changed:
        raise PrivacyError(
            f"the ledger already holds a different fine-tuning plan ({', '.join(f'{k}: {old.get(k)} -> {new.get(k)}' for k in changed)}); "
            f"a run directory's privacy plan cannot change once training has started"
        )


def spent_epsilon(ledger: PrivacyLedger, delta: float, accountant: str) -> float:
    return accounting.epsilon(ledger.events(), delta, accountant=accountant)


def finetune(config, rd: RunDir, private: ImageDataset, device, progress: bool = True) -> dict:
    weights, spec_dict, _ = load_weights(rd.checkpoints / PRETRAIN_WEIGHTS)
    spec = DiffusionSpec(**spec_dict)
    if list(private.image_shape) != list(spec.image_shape):
        raise DataError(
            f"private data {private.path} has images of shape {private.image_shape}, the model was built for "
            f"{tuple(spec.image_shape)}"
        )
    if private.labels.max() >= spec.num_classes:
        raise DataError(
            f"{private.path}: label {int(private.labels.max())} is outside data.num_classes={spec.num_classes}"
        )
    torch.manual_seed(config.seed)
    model = ConditionalDiffusion(spec)
    model.load_state_dict(weights)
    model.to(device).train()
    validate_model(model)
    make_conv_inputs_contiguous(model)
    ft, pv = config.finetune, config.privacy

    units = PrivacyUnits.from_subjects(private.subjects, len(private))
    ledger = PrivacyLedger(rd.ledger_path)
    plan = privacy_plan(config, len(units), units.kind)
    old = ledger.latest("dp_plan", mechanism=MECHANISM)
    if old is None:
        ledger.append(plan)
    else:
        _check_same_plan(old, plan)
        plan = old
    sigma, q = plan["sigma"], plan["sample_rate"]

    objective = DiffusionObjective(model, config.model.cond_drop_prob)
    # 1. preflight on random inputs of the private shape
    g = step_generator(config.seed, 0, "preflight")
    batch = objective.random_batch(tuple(spec.image_shape), spec.num_classes, PREFLIGHT_BATCH, g)
    report = preflight(model, objective.loss, {k: v.to(device) for k, v in batch.items()}, mode=ft.grad_sample_mode)
    ledger.append({"kind": "preflight", "mechanism": MECHANISM, **report.to_dict()})
    require_preflight(report)

    # 2. the DP label histogram, released once (its cost is already in the plan)
    if config.sample.class_counts.mode == "dp_histogram" and ledger.latest("dp_release", name="label_histogram") is None:
        hist = release_label_histogram(
            private.labels, units, spec.num_classes, config.sample.class_counts.histogram_sigma,
            step_generator(secret_noise_seed(rd), 0, "histogram"),
        )
        ledger.append({
            "kind": "dp_release", "name": "label_histogram", "values": hist.tolist(),
            "event": {"type": "gaussian", "sigma": config.sample.class_counts.histogram_sigma, "count": 1},
            "unit": units.kind, "note": "Gaussian mechanism on per-unit label fractions (L2 sensitivity 1)",
        })

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=ft.lr, weight_decay=0.0)
    dp = DPSGD(
        model, optimizer, noise_multiplier=sigma, max_grad_norm=ft.max_grad_norm,
        expected_batch_size=q * len(units), grad_sample_mode=ft.grad_sample_mode,
    )
    ema = EMA(model, ft.ema_decay)
    state_path = rd.checkpoints / "finetune_state.safetensors"
    start = 0
    if state_path.is_file():
        start, _ = load_training_state(state_path, model, ema, optimizer)
    noise_seed = secret_noise_seed(rd)
    data = private.model_tensor()
    labels = torch.as_tensor(private.labels)
    logger = TBLogger(rd.logs / "finetune")

    def record_progress(done: int) -> None:
        last = ledger.latest("dp_progress", mechanism=MECHANISM)
        if last is not None and last["steps_done"] >= done:
            return
        event = dp_event(sigma, q, done)
        eps = math.inf if sigma == 0 else accounting.epsilon([event, *plan["other_events"]], pv.delta, "pld")
        ledger.append({"kind": "dp_progress", "mechanism": MECHANISM, "steps_done": done, "event": event,
                       "epsilon_pld": eps, "delta": pv.delta})

    if start:
        record_progress(start)  # the checkpoint may be newer than the last ledger line

    def step_fn(step: int) -> float:
        chosen = units.poisson_sample(q, step_generator(config.seed, step, "poisson"))
        chunks = units.physical_chunks(chosen, ft.physical_batch_size)

        def make_batch(chunk: int, rows: np.ndarray, k: int) -> dict:
            g = step_generator(config.seed, step, f"draw:{chunk}:{k}")
            return objective.draw(data[rows].to(device), labels[rows].to(device), g)

        loss = dp.step(chunks, make_batch, objective.loss, ft.noise_multiplicity,
                       step_generator(noise_seed, step, "noise"))
        ema.update(model)
        logger.scalar("finetune/batch_units", len(chosen), step + 1)
        return loss

    def checkpoint(done: int) -> None:
        save_training_state(state_path, model, ema, optimizer, done)
        record_progress(done)

    last_loss = run_steps(
        start=start, total=ft.steps, step_fn=step_fn, checkpoint_fn=checkpoint, checkpoint_every=ft.checkpoint_every,
        desc="finetune (DP)", log_fn=logger.scalar, progress=progress,
    )
    logger.close()
    dp.close()

    eps_pld = spent_epsilon(ledger, pv.delta, "pld") if sigma > 0 else math.inf
    eps_rdp = spent_epsilon(ledger, pv.delta, "rdp") if sigma > 0 else math.inf
    if eps_pld > pv.epsilon * (1 + 1e-9):
        raise PrivacyError(f"spent epsilon {eps_pld:.4f} exceeds the target {pv.epsilon}; weights not released")
    complete = {
        "kind": "dp_complete", "mechanism": MECHANISM, "steps_done": ft.steps, "event": dp_event(sigma, q, ft.steps),
        "sigma": sigma, "sample_rate": q, "max_grad_norm": ft.max_grad_norm, "unit": units.kind,
        "epsilon_pld": eps_pld, "epsilon_rdp": eps_rdp, "delta": pv.delta, "target_epsilon": pv.epsilon,
    }
    if ledger.latest("dp_complete", mechanism=MECHANISM) is None:
        ledger.append(complete)
    if sigma > 0 and ledger.latest("bound", mechanism=MECHANISM) is None:
        # Reconstruction robustness at the default prior kappa = 1/N (one record guessed at random).
        kappa = 1.0 / len(units)
        ledger.append({"kind": "bound", "mechanism": MECHANISM, "unit": units.kind,
                       "bound": rero_bound(sigma, q, ft.steps, kappa, method="tight"),
                       "bound_gdp": rero_bound(sigma, q, ft.steps, kappa, method="gdp")})
    info = {"stage": "finetune", "privacy": complete, "preflight": report.to_dict()}
    save_weights(rd.checkpoints / FINETUNE_WEIGHTS, {**model.state_dict(), **ema.state_dict()}, spec.to_dict(), info)
    if ledger.latest("artifact", name="finetune_weights") is None:
        ledger.append({"kind": "artifact", "name": "finetune_weights", "path": f"checkpoints/{FINETUNE_WEIGHTS}",
                       "privacy_source": MECHANISM})
    return {"steps": ft.steps, "sigma": sigma, "sample_rate": q, "unit": units.kind, "epsilon": eps_pld,
            "epsilon_rdp": eps_rdp, "delta": pv.delta, "final_loss": last_loss,
            "preflight_max_error": report.max_relative_error, "resumed_from": start}


def describe(result: dict) -> str:
    return json.dumps(result, indent=2, default=str)
