"""The ONE place where federated code calls dpgen's training and privacy code.

Everything else under dpgen/federated/ (Flower apps, launchers, records) goes through the
functions below; when the DP core changes (issue 11: one DP-SGD loop, secret Poisson
sampling from dpgen/privacy/randomness.py, a typed ledger), this module is what gets
re-pointed. The interface:

    plan_site(site)                          -> SitePlan   # at site launch: plan in the ledger, or refuse
    site_status(site, schema, round_index)   -> dict       # may this site take round r? (public facts only)
    local_round(site, global_model, round_index) -> RoundResult(update, facts)
    finish_site(site, reason)                -> dict       # completion entry + bound in the site's ledger
    pretrain_global(fed, rd, image_shape, device) -> GlobalModel   # coordinator: public pretraining
    load_global(path, fed) / save_global(path, global_model, info)

What `local_round` does, on top of today's `dpgen.training.dp.run_dp_job` (unchanged):

- The site's plan is one DP-SGD mechanism (`dp_sgd:finetune`) of rounds x local_steps steps
  at sample rate q = batch_size / N_site, registered once at launch (`plan_site`). Round r
  gets the next `local_steps` step indices [a, b) of that mechanism, written to the ledger
  (`fed_round_start`) before its first DP-SGD step. Indices are never reused for
  other inputs: a round retried with the very same global weights (same fingerprint)
  continues its allocation (resuming from the round's checkpoint, recomputing identically),
  anything else gets fresh indices. An allocation abandoned half-way stays spent.
- A round that would go past the plan (b > rounds x local_steps, i.e. over budget) is refused
  before any DP-SGD step.
- `run_dp_job` runs steps a..b from a state file holding the global weights at step a; its
  per-step randomness is keyed by the absolute step index: Poisson masks from the site's
  *secret* sampling seed (passed as config.seed, in memory only: today's loop draws masks
  from config.seed), DP noise from the secret noise seed in internal/. Its progress entries
  carry cumulative events, so the ledger composes all rounds as one mechanism. Its one-shot
  completion and bound entries are deferred (`_RoundLedger`) and written for the whole plan by
  `finish_site`, after the site's last round.
- The update is (weights after the round) - (global weights), for the coordinator's trainable
  names only; it is DP (post-processing of DP-SGD) and is also kept in internal/rounds/.

Hooks the lead may want in the new DP core so this module can shrink: a loop entry point
taking (first_step, last_step, initial weights) instead of a state file; a way to defer the
completion/bound entries (or to mark a mechanism "in progress across jobs"); secret sampling
that does not ride on config.seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpgen.federated import arrays
from dpgen.federated.arrays import Weights

FED_MECHANISM = "dp_sgd:finetune"  # the site's one DP mechanism (same id as a single-site run)
ROUND_STATE = "round_state.safetensors"
PRETRAIN_WEIGHTS = "pretrain.safetensors"  # = dpgen.training.families.shared.PRETRAIN_WEIGHTS
FINETUNE_WEIGHTS = "finetune.safetensors"  # = dpgen.training.families.shared.FINETUNE_WEIGHTS


def ledger(run_dir: str | Path):
    """The privacy ledger of a run directory (the coordinator's or a site's)."""
    from dpgen.privacy.ledger import PrivacyLedger

    return PrivacyLedger.for_run(run_dir)


class SiteRefusal(RuntimeError):
    """The site will not take part (in this round): over budget, wrong schema, no SecAgg..."""


# ----------------------------------------------------------------------------- threads


def limit_threads() -> int:
    """One compute thread per process unless DPGEN_THREADS says otherwise (sites and the
    coordinator share machines with other work; the demo runs them all on one machine)."""
    import torch

    n = max(1, int(os.environ.get("DPGEN_THREADS", "1")))
    torch.set_num_threads(n)
    return n


# ----------------------------------------------------------------------------- the global model


@dataclass
class GlobalModel:
    """What the coordinator sends every round (all public: post-processing of DP updates)."""

    family: str
    spec: dict
    model_config: dict  # the federation's `model` section (the sites' objective reads it)
    num_classes: int
    trainable: str
    names: list[str]  # every tensor of the model, in wire order
    train_names: list[str]  # the tensors the sites update, in wire order
    weights: Weights = field(repr=False)
    shapes: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.shapes:
            self.shapes = {n: list(self.weights[n].shape) for n in self.names}

    @property
    def fingerprint(self) -> str:
        return arrays.fingerprint(self.weights, self.names)

    @property
    def image_shape(self) -> list[int]:
        return list(self.spec["image_shape"])

    def with_weights(self, weights: Weights) -> "GlobalModel":
        return dataclasses.replace(self, weights=weights)

    def schema(self) -> dict:
        """The public description a site checks before training (JSON-able)."""
        return {"family": self.family, "spec": self.spec, "model_config": self.model_config,
                "num_classes": self.num_classes, "trainable": self.trainable, "names": self.names,
                "train_names": self.train_names, "shapes": self.shapes}

    @classmethod
    def from_schema(cls, schema: dict, weights: Weights) -> "GlobalModel":
        return cls(schema["family"], schema["spec"], schema["model_config"], int(schema["num_classes"]),
                   schema["trainable"], list(schema["names"]), list(schema["train_names"]), weights,
                   {k: list(v) for k, v in schema["shapes"].items()})

    @classmethod
    def from_vector(cls, schema: dict, vector: np.ndarray) -> "GlobalModel":
        """The model from its wire form: the public schema and one float32 vector."""
        return cls.from_schema(schema, arrays.unflatten(vector, list(schema["names"]), schema["shapes"]))

    def vector(self) -> np.ndarray:
        return arrays.flatten(self.weights, self.names)


def _build(family: str, spec: dict):
    from dpgen.models import build_model, spec_from_dict

    return build_model(family, spec_from_dict(family, spec))


def _trainable_names(family: str, spec: dict, trainable: str) -> list[str]:
    from dpgen.training.trainable import select_trainable

    model = _build(family, spec)
    select_trainable(model, trainable)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def load_global(path: Path, fed) -> GlobalModel:
    """A dpgen weights file (pretrain or a round checkpoint) as the federation's global model."""
    from dpgen.training.common import load_checkpoint

    family, tensors, spec, _ = load_checkpoint(path)
    names = list(_build(family, spec).state_dict().keys())
    bad = [n for n in names if not tensors[n].is_floating_point()]
    if bad:
        raise ValueError(f"{path}: federated models must hold floating-point tensors only ({bad[:3]})")
    weights = {n: tensors[n].float().numpy() for n in names}
    return GlobalModel(family, spec, fed.model.model_dump(mode="json"), fed.data.num_classes,
                       fed.coordinator.trainable, names, _trainable_names(family, spec, fed.coordinator.trainable),
                       weights)


def save_global(path: Path, gm: GlobalModel, info: dict) -> None:
    import torch

    from dpgen.training.common import save_weights

    save_weights(path, {n: torch.from_numpy(np.ascontiguousarray(gm.weights[n])) for n in gm.names}, gm.spec, info,
                 family=gm.family)


def pretrain_global(fed, rd, image_shape: list[int], device="cpu", progress: bool = False) -> GlobalModel:
    """Public pretraining on the coordinator (checkpoints/pretrain.safetensors; no privacy cost)."""
    from dpgen.data import load_dataset
    from dpgen.federated.config import coordinator_run_config
    from dpgen.training.families import trainer

    config = coordinator_run_config(fed, image_shape)
    public = load_dataset(fed.data.public) if fed.data.public is not None else None
    if public is not None:
        rd.record_datasets({f"public/{public.split}": public.info()})
    path = rd.checkpoints / PRETRAIN_WEIGHTS
    if not path.is_file():
        trainer(config.model.generator).pretrain(config, rd, public, tuple(image_shape), device, progress)
    return load_global(path, fed)


def public_image_shape(fed) -> list[int]:
    from dpgen.data import load_dataset

    if fed.data.image_shape:
        return list(fed.data.image_shape)
    if fed.data.public is None:
        from dpgen.config import ConfigError

        raise ConfigError("config error: data.image_shape is required when there is no public data")
    return list(load_dataset(fed.data.public).image_shape)


# ----------------------------------------------------------------------------- a site


@dataclass
class SiteRun:
    """One site's run directory and config (see dpgen.federated.site for the layout)."""

    name: str
    file: object  # dpgen.federated.config.SiteFile
    root: Path

    @property
    def config(self):
        return self.file.site

    @property
    def rd(self):
        from dpgen.rundir import RunDir

        return RunDir(self.root)

    @property
    def ledger(self):
        return ledger(self.root)


def load_site_data(site: SiteRun):
    """The site's private images (any dpgen source), sliced to `rows` if given."""
    from dpgen.data import DataError, load_dataset
    from dpgen.data.dataset import ImageDataset

    cfg = site.config
    ds = load_dataset(cfg.data)
    if cfg.rows is not None:
        start, stop = cfg.rows
        if stop > len(ds):
            raise DataError(f"{ds.path}: sites.{site.name}.rows = [{start}, {stop}) but the source has {len(ds)} rows")
        sl = slice(start, stop)
        ds = ImageDataset(
            images=ds.images[sl], labels=ds.labels[sl], name=ds.name, path=ds.path, split=ds.split,
            fingerprint=f"{ds.fingerprint}[{start}:{stop}]",
            subjects=None if ds.subjects is None else ds.subjects[sl],
            attributes=None if ds.attributes is None else ds.attributes[sl],
            attribute_names=list(ds.attribute_names), intensity_range=ds.intensity_range,
        )
    return ds


def _units(ds):
    from dpgen.privacy.engine import PrivacyUnits

    return PrivacyUnits.from_subjects(ds.subjects, len(ds))


def _secrets(site: SiteRun) -> dict:
    """The site's secret seeds (internal/secrets.json, never sent, never released): DP noise
    (dpgen's own secret_noise_seed) and the Poisson sampling stream."""
    from dpgen.privacy.engine import new_secret_seed
    from dpgen.rundir import write_json_atomic
    from dpgen.training.dp import secret_noise_seed

    rd = site.rd
    secret_noise_seed(rd)
    path = rd.internal / "secrets.json"
    secrets = rd.read_json(path)
    if "sampling_seed" not in secrets:
        secrets["sampling_seed"] = new_secret_seed()
        write_json_atomic(path, secrets)
    return secrets


def _run_config(site: SiteRun, *, model: dict | None = None, num_classes: int = 1, trainable: str = "all",
                seed: int = 0):
    from dpgen.federated.config import site_run_config

    return site_run_config(site.name, site.config, model=model or {}, num_classes=num_classes, trainable=trainable,
                           seed=seed)


@dataclass
class SitePlan:
    plan: dict  # the ledger's dp_plan entry (holds N, q and sigma: stays at the site)
    facts: dict  # what the site tells the coordinator (no count of private data)


def _public_plan_facts(site: SiteRun, plan: dict) -> dict:
    ft = site.config.finetune
    return {
        "site": site.name, "mechanism": plan["mechanism"], "unit": plan["unit"],
        "target_epsilon": plan["target_epsilon"], "delta": plan["delta"], "accountant": plan["accountant"],
        "neighbouring_relation": plan.get("neighbouring", "add_remove"), "rounds": ft.rounds,
        "local_steps": ft.local_steps, "planned_steps": plan["planned_steps"],
        "expected_batch_size": plan["expected_batch_size"], "max_grad_norm": plan["max_grad_norm"],
        "noise_multiplicity": plan["noise_multiplicity"], "poisson_sampling": True,
    }


def _affordable_rounds(sigma: float, q: float, local_steps: int, rounds: int, epsilon: float, delta: float,
                       accountant: str) -> int:
    from dpgen.privacy import accounting
    from dpgen.training.dp import dp_event

    for k in range(rounds, 0, -1):
        if accounting.epsilon([dp_event(sigma, q, k * local_steps)], delta, accountant) <= epsilon:
            return k
    return 0


def plan_site(site: SiteRun) -> SitePlan:
    """Calibrate and register the site's plan (once; a restarted site must present the same
    plan). Refuses (SiteRefusal) when the budget cannot pay for the planned rounds."""
    from dpgen.privacy import accounting
    from dpgen.privacy.engine import PrivacyError
    from dpgen.training.dp import DPSettings, plan_mechanism, register_plan

    cfg, ft = site.config, site.config.finetune
    ds = load_site_data(site)
    units = _units(ds)
    config = _run_config(site)
    settings = DPSettings.from_finetune(config.finetune)
    what = f"site {site.name}: epsilon {cfg.privacy.epsilon:g} for {ft.rounds} round(s) x {ft.local_steps} steps"
    try:
        plan = plan_mechanism(config, settings, len(units), units.kind, mechanism=FED_MECHANISM,
                              budget=cfg.privacy.epsilon, other_events=[], trains="diffusion UNet (federated site)",
                              federated={"site": site.name, "rounds": ft.rounds, "local_steps": ft.local_steps})
    except PrivacyError as err:
        raise SiteRefusal(f"site {site.name}: {err}") from None
    except ValueError as err:
        one = ft.rounds > 1
        if one:
            try:
                accounting.calibrate_sigma(cfg.privacy.epsilon, cfg.privacy.delta, settings.batch_size / len(units),
                                           ft.local_steps, accountant=cfg.privacy.accountant)
            except ValueError:
                one = False
        if not one:
            raise SiteRefusal(f"{what}: the privacy budget is too small for one round ({err}); raise "
                              f"privacy.epsilon or lower finetune.local_steps") from None
        raise SiteRefusal(f"{what}: the privacy budget is too small for the planned rounds ({err}); "
                          f"lower finetune.rounds or raise privacy.epsilon") from None
    cap = ft.max_noise_multiplier
    if cap is not None and plan["sigma"] > cap:
        k = _affordable_rounds(cap, plan["sample_rate"], ft.local_steps, ft.rounds, cfg.privacy.epsilon,
                               cfg.privacy.delta, cfg.privacy.accountant)
        if k == 0:
            raise SiteRefusal(f"{what}: the privacy budget is too small for one round at noise multiplier <= {cap:g} "
                              f"(finetune.max_noise_multiplier); raise privacy.epsilon or lower finetune.local_steps")
        raise SiteRefusal(f"{what} needs noise multiplier {plan['sigma']:.3g} > finetune.max_noise_multiplier = {cap:g}; "
                          f"at {cap:g} the budget pays for {k} round(s): set finetune.rounds <= {k}")
    ledger = site.ledger
    try:
        plan = register_plan(ledger, plan)
    except PrivacyError as err:
        raise SiteRefusal(f"site {site.name}: {err}") from None
    _secrets(site)
    facts = _public_plan_facts(site, plan)
    if ledger.latest("fed_site_plan") is None:
        ledger.append({"kind": "fed_site_plan", **facts, "site_data": ds.info()})
    return SitePlan(plan, facts)


def _registered_plan(site: SiteRun) -> dict:
    plan = site.ledger.latest("dp_plan", mechanism=FED_MECHANISM)
    if plan is None:
        raise SiteRefusal(f"site {site.name}: no privacy plan in {site.rd.ledger_path}; start the site with "
                          f"`dpgen federated site`")
    return plan


def _allocated_end(ledger) -> int:
    ends = [int(e["last_step"]) for e in ledger.entries() if e.get("kind") == "fed_round_start"]
    return max(ends, default=0)


def _epsilon_at(plan: dict, steps: int, accountant: str) -> float:
    from dpgen.privacy import accounting
    from dpgen.training.dp import dp_event

    if steps <= 0:
        return 0.0
    return accounting.epsilon([dp_event(plan["sigma"], plan["sample_rate"], steps)], plan["delta"], accountant)


def check_schema(site: SiteRun, schema: dict, ds=None) -> None:
    """The global model's public schema against the site's data (shape, label space, family)."""
    ds = ds if ds is not None else load_site_data(site)
    if schema["family"] != "diffusion":
        raise SiteRefusal(f"site {site.name}: the coordinator trains a {schema['family']!r} model; federated sites "
                          f"support 'diffusion'")
    shape = list(schema["spec"]["image_shape"])
    if list(ds.image_shape) != shape:
        raise SiteRefusal(f"site {site.name}: its images ({ds.path}) have shape {tuple(ds.image_shape)}, the global "
                          f"model takes {tuple(shape)}; this site cannot join (no resampling)")
    if len(ds.labels) and int(ds.labels.max()) >= int(schema["num_classes"]):
        raise SiteRefusal(f"site {site.name}: a label of {ds.path} is outside the federation's "
                          f"num_classes = {schema['num_classes']}")


def progress_facts(site: SiteRun, round_index: int | None = None) -> dict:
    """Spent epsilon of the site, recomputed from its ledger (what the coordinator records)."""
    from dpgen.training.dp import spent_epsilon

    ledger, plan = site.ledger, _registered_plan(site)
    cur = ledger.latest("dp_complete", mechanism=FED_MECHANISM) or ledger.latest("dp_progress", mechanism=FED_MECHANISM)
    steps = int(cur["steps_done"]) if cur else 0
    eps = spent_epsilon(ledger, plan["delta"], "pld") if steps else 0.0
    eps_rdp = spent_epsilon(ledger, plan["delta"], "rdp") if steps else 0.0
    done = [e for e in ledger.entries() if e.get("kind") == "fed_round_done"]
    return {
        "site": site.name, "round": round_index, "steps_done": steps, "planned_steps": plan["planned_steps"],
        "steps_allocated": _allocated_end(ledger), "rounds_done": len({e["round"] for e in done}),
        "epsilon_pld": eps, "epsilon_rdp": eps_rdp, "delta": plan["delta"], "target_epsilon": plan["target_epsilon"],
        "within_target": bool(eps <= plan["target_epsilon"] * (1 + 1e-9)), "unit": plan["unit"],
        "complete": ledger.latest("dp_complete", mechanism=FED_MECHANISM) is not None,
    }


def site_status(site: SiteRun, schema: dict, round_index: int) -> dict:
    """Whether the site will take round `round_index` of a model with `schema`, and its public
    facts. Never raises for a refusal: the reason goes back to the coordinator; `fatal` says
    the site can never join (wrong image shape, labels, data errors), not just not now."""
    plan = _registered_plan(site)
    ledger = site.ledger
    out = {"site": site.name, "accept": True, "reason": "", "fatal": False, "plan": _public_plan_facts(site, plan),
           "progress": progress_facts(site, round_index)}
    try:
        try:
            check_schema(site, schema)
        except SiteRefusal:
            out["fatal"] = True  # this site can never join this federation
            raise
        if ledger.latest("dp_complete", mechanism=FED_MECHANISM) is not None:
            raise SiteRefusal(f"site {site.name}: its plan is complete (finished or stopped); it takes no more rounds")
        left = plan["planned_steps"] - _allocated_end(ledger)
        out["rounds_affordable"] = left // site.config.finetune.local_steps
        if left < site.config.finetune.local_steps:
            raise SiteRefusal(f"site {site.name}: round {round_index} would take it over its budget "
                              f"({_allocated_end(ledger)} of {plan['planned_steps']} planned steps spent)")
    except SiteRefusal as err:
        out.update(accept=False, reason=str(err))
    except Exception as err:  # noqa: BLE001 - a data problem is a refusal with its message
        out.update(accept=False, fatal=True, reason=f"site {site.name}: {err}")
    return out


class _RoundLedger:
    """The site's ledger as `run_dp_job` sees it during one round: everything is appended to
    the real ledger, except that the job's one-shot completion and bound entries are deferred
    (a round is not the end of the mechanism); `finish_site` writes them for the whole plan."""

    DEFERRED = ("dp_complete", "bound")

    def __init__(self, ledger):
        self._ledger = ledger

    def __getattr__(self, name):
        return getattr(self._ledger, name)

    def latest(self, kind: str, **match):
        if kind in self.DEFERRED:
            return {"kind": kind, "deferred_to": "finish_site"}
        return self._ledger.latest(kind, **match)


@dataclass
class RoundResult:
    update: Weights  # train_names -> (weights after the round) - (global weights)
    facts: dict  # public privacy facts after the round
    replayed: bool = False


def _round_state_matches(path: Path, key: dict) -> bool:
    meta = path.with_suffix(".json")
    if not (path.is_file() and meta.is_file()):
        return False
    try:
        return json.loads(meta.read_text()) == key
    except ValueError:
        return False


def local_round(site: SiteRun, gm: GlobalModel, round_index: int, *, device="cpu",
                progress: bool = False) -> RoundResult:
    """One round of the site's DP-SGD from the global weights (see the module docstring)."""
    import torch

    from dpgen.rundir import write_json_atomic
    from dpgen.training.common import EMA, save_state
    from dpgen.training.dp import run_dp_job
    from dpgen.training.families.diffusion import unet_job
    from dpgen.training.families.shared import private_rows

    ledger, plan, ft = site.ledger, _registered_plan(site), site.config.finetune
    fp = gm.fingerprint
    rounds_dir = site.rd.internal / "rounds"
    update_path = rounds_dir / f"round_{round_index:04d}.safetensors"

    # 1. The same round from the same global weights, already done: send the same update again.
    done = ledger.latest("fed_round_done", round=round_index, global_sha256=fp)
    if done is not None and update_path.is_file():
        update = arrays.load(update_path)
        if arrays.fingerprint(update, gm.train_names) == done["update_sha256"]:
            return RoundResult(update, progress_facts(site, round_index), replayed=True)

    ds = load_site_data(site)
    check_schema(site, gm.schema(), ds)
    if ledger.latest("dp_complete", mechanism=FED_MECHANISM) is not None:
        raise SiteRefusal(f"site {site.name}: its plan is complete; it takes no more rounds")
    units = _units(ds)

    # 2. Step indices for this round, recorded before any private data is used.
    start = ledger.latest("fed_round_start", round=round_index, global_sha256=fp)
    if start is None:
        first = _allocated_end(ledger)
        last = first + ft.local_steps
        if last > plan["planned_steps"] or _epsilon_at(plan, last, plan["accountant"]) > plan["target_epsilon"] * (1 + 1e-9):
            raise SiteRefusal(f"site {site.name}: round {round_index} would take it over its budget "
                              f"({first} of {plan['planned_steps']} planned steps spent; epsilon "
                              f"{plan['target_epsilon']:g})")
        start = ledger.append({"kind": "fed_round_start", "mechanism": FED_MECHANISM, "round": round_index,
                               "global_sha256": fp, "first_step": first, "last_step": last})
    first, last = int(start["first_step"]), int(start["last_step"])

    # 3. The model at the global weights, the job dpgen's diffusion trainer builds for it.
    secrets = _secrets(site)
    config = _run_config(site, model=gm.model_config, num_classes=gm.num_classes, trainable=gm.trainable,
                         seed=secrets["sampling_seed"])
    model = _build(gm.family, gm.spec)
    model.load_state_dict({n: torch.from_numpy(np.array(gm.weights[n])) for n in gm.names})
    rows = private_rows(ds, model.spec.attributes)
    job, _ = unet_job(config, site.rd, ledger, model, rows, units, [], "diffusion UNet (federated site)")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if names != gm.train_names:
        raise SiteRefusal(f"site {site.name}: its trainable selection ({len(names)} tensors) differs from the "
                          f"coordinator's ({len(gm.train_names)}); check the dpgen versions")
    job.settings = dataclasses.replace(job.settings, steps=last)
    job.state_path = site.rd.checkpoints / ROUND_STATE
    key = {"round": round_index, "global_sha256": fp, "first_step": first, "last_step": last}
    if not _round_state_matches(job.state_path, key):
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=ft.lr, weight_decay=0.0)
        save_state(job.state_path, {"": (model, EMA(model, 0.0), optimizer)}, first)
        write_json_atomic(job.state_path.with_suffix(".json"), key)

    # 4. DP-SGD steps first..last (dpgen's loop: preflight, Poisson sampling, clipping, noise, progress).
    result = run_dp_job(config, site.rd, _RoundLedger(ledger), job, units, device, progress)

    # 5. The update, kept in internal/ and sent (masked) to the coordinator.
    state = model.state_dict()
    update = {n: (state[n].detach().cpu().numpy().astype(np.float32) - gm.weights[n]) for n in gm.train_names}
    arrays.save(update_path, update, {"round": str(round_index), "global_sha256": fp})
    ledger.append({
        "kind": "fed_round_done", "mechanism": FED_MECHANISM, "round": round_index, "global_sha256": fp,
        "first_step": first, "last_step": last, "update_sha256": arrays.fingerprint(update, gm.train_names),
        "update_max_abs": float(max((np.abs(v).max() for v in update.values()), default=0.0)),
        "epsilon_pld": result["epsilon"], "epsilon_rdp": result["epsilon_rdp"], "final_loss": result["final_loss"],
        "resumed_from": result["resumed_from"],
    })
    if last >= plan["planned_steps"]:
        finish_site(site, "all planned rounds done")
    return RoundResult(update, progress_facts(site, round_index))


def finish_site(site: SiteRun, reason: str) -> dict:
    """The site's completion entry and reconstruction bound, for the steps actually spent
    (all planned rounds, or fewer when the federation stopped first). Written once."""
    from dpgen.privacy.bounds import rero_bound
    from dpgen.training.dp import dp_event, spent_epsilon

    ledger, plan = site.ledger, _registered_plan(site)
    if ledger.latest("dp_complete", mechanism=FED_MECHANISM) is None:
        cur = ledger.latest("dp_progress", mechanism=FED_MECHANISM)
        steps = int(cur["steps_done"]) if cur else 0
        sigma, q = plan["sigma"], plan["sample_rate"]
        eps = spent_epsilon(ledger, plan["delta"], "pld") if steps else 0.0
        eps_rdp = spent_epsilon(ledger, plan["delta"], "rdp") if steps else 0.0
        entry = {"kind": "dp_complete", "mechanism": FED_MECHANISM, "steps_done": steps,
                 "event": dp_event(sigma, q, steps) if steps else [], "sigma": sigma, "sample_rate": q,
                 "max_grad_norm": plan["max_grad_norm"], "unit": plan["unit"], "epsilon_pld": eps,
                 "epsilon_rdp": eps_rdp, "delta": plan["delta"], "target_epsilon": plan["target_epsilon"],
                 "world_size": 1, "federated": {"reason": reason, "planned_steps": plan["planned_steps"]}}
        if eps > plan["target_epsilon"] * (1 + 1e-9):  # cannot happen: every round was checked first
            raise SiteRefusal(f"site {site.name}: spent epsilon {eps:.4f} exceeds the target {plan['target_epsilon']}")
        ledger.append(entry)
        if steps and sigma > 0 and math.isfinite(eps):
            kappa = 1.0 / plan["n_units"]
            ledger.append({"kind": "bound", "mechanism": FED_MECHANISM, "unit": plan["unit"],
                           "bound": rero_bound(sigma, q, steps, kappa, method="tight"),
                           "bound_gdp": rero_bound(sigma, q, steps, kappa, method="gdp")})
    return progress_facts(site)
