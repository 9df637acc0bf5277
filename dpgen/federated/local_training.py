"""The ONE place where federated code calls dpgen's training and privacy code.

Everything else under dpgen/federated/ (Flower apps, launchers, records) goes through the
functions below. The interface:

    plan_site(site)                          -> SitePlan   # at site launch: plan in the ledger, or refuse
    site_status(site, schema, round_index)   -> dict       # may this site take round r? (N-free facts only)
    local_round(site, global_model, round_index) -> RoundResult(update, facts)
    finish_site(site, reason)                -> SiteProgressFacts  # completion entry + bound in the site's ledger
    pretrain_global(fed, rd, image_shape, device) -> GlobalModel   # coordinator: public pretraining
    load_global(path, fed) / save_global(path, global_model, info)

A site is an ordinary dpgen run directory with one DP mechanism, `dp_sgd:finetune`, run with
dpgen's one DP-SGD loop (`dpgen.privacy.dpsgd.DPSGDLoop` through
`dpgen.training.dp.run_dp_job`):

- Its plan covers rounds x local_steps steps at sample rate q = batch_size / the site's public_unit_count, calibrated
  and registered once at launch (`plan_site`, `register_plan`); nothing is recalibrated per
  round (`local_round` reads the registered `PlanEntry`).
- Round r gets the next `local_steps` step indices [a, b) of that plan, written to the ledger
  (`fed_round_start`) before its first DP-SGD step. A round retried with the very same global
  weights (same fingerprint) continues its allocation (resuming from the round's checkpoint,
  recomputing identically); anything else gets fresh indices. An allocation abandoned half-way
  stays spent. A round that would go past the plan (over the budget) is refused first.
- `run_dp_job(..., first_step=a, last_step=b, start_key=..., complete=False)` runs steps a..b of
  the plan from the global weights. Step i's Poisson sample, per-row draws and noise come from
  the site's own secret seed (internal/secrets.json of the site's run directory, through
  `run_secret`), so a site's masks are a function of (its secret, the global step index). Its
  progress entries carry the cumulative event, so the site's ledger composes all rounds as
  one mechanism. The completion and bound entries are written by `finish_site`
  (`complete_mechanism`) when the site's last round is done or the federation ends, counting
  every allocated step.
- The module and its objective are built once per site process and trained again every round
  (new weights), so the per-sample-gradient preflight runs once per process on the exact
  module and mode trained, before any private data (`DPJob.reuse_preflight`).
- The update is (weights after the round) - (global weights), for the coordinator's trainable
  names only: post-processing of DP-SGD, kept in internal/rounds/ and sent masked.

What a site tells the coordinator (`SitePlanFacts`, `SiteProgressFacts`, typed in
dpgen/privacy/schema.py) never depends on its number of units N: no N, sample rate, noise
multiplier or exact epsilon under add/remove neighbours (the exact replace-one epsilon only
when the site's relation is replace_one).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpgen.federated import arrays
from dpgen.federated.arrays import Weights

ROUND_STATE = "round_state.safetensors"


def _mechanisms():
    from dpgen.privacy import mechanisms

    return mechanisms


def site_mechanism() -> str:
    """The site's one DP mechanism: the same id as a single-site fine-tune."""
    return _mechanisms().FINETUNE


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
    from dpgen.models.registry import family as family_of

    fam = family_of(family)
    return fam.build_model(fam.spec_from_dict(spec))


def _trainable_names(family: str, spec: dict, trainable: str) -> list[str]:
    from dpgen.training.trainable import select_trainable

    model = _build(family, spec)
    select_trainable(model, trainable)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def load_global(path: Path, fed) -> GlobalModel:
    """A dpgen weights file (pretrain or a round checkpoint) as the federation's global model."""
    from dpgen.core.checkpoints import load_checkpoint

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

    from dpgen.core.checkpoints import save_weights

    save_weights(path, {n: torch.from_numpy(np.ascontiguousarray(gm.weights[n])) for n in gm.names}, gm.spec, info,
                 family=gm.family)


def pretrain_global(fed, rd, image_shape: list[int], device="cpu", progress: bool = False) -> GlobalModel:
    """Public pretraining on the coordinator (checkpoints/pretrain.safetensors; no privacy cost)."""
    from dpgen.data import load_dataset
    from dpgen.federated.config import coordinator_run_config
    from dpgen.models.registry import family

    config = coordinator_run_config(fed, image_shape)
    public = load_dataset(fed.data.public) if fed.data.public is not None else None
    if public is not None:
        rd.record_datasets({f"public/{public.split}": public.info()})
    path = rd.pretrain_weights
    if not path.is_file():
        family(config.model.generator).trainer_module.pretrain(config, rd, public, tuple(image_shape), device, progress)
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


def _run_config(site: SiteRun, *, model: dict | None = None, num_classes: int = 1, trainable: str = "all"):
    from dpgen.federated.config import site_run_config

    return site_run_config(site.name, site.config, model=model or {}, num_classes=num_classes, trainable=trainable)


@dataclass
class SitePlan:
    plan: object  # the ledger's PlanEntry (holds N, q and sigma: stays at the site)
    facts: object  # SitePlanFacts: what the site tells the coordinator (nothing that depends on N)


def plan_facts(site: SiteRun, entry) -> "SitePlanFacts":  # noqa: F821
    """The public part of the site's plan: its budget, relation, unit and user choices."""
    from dpgen.privacy.schema import SitePlanFacts

    ft = site.config.finetune
    return SitePlanFacts(
        site=site.name, unit=entry.unit, target_epsilon=entry.target_epsilon, delta=entry.delta,
        neighbouring=entry.neighbouring, accountant=entry.accountant, rounds=ft.rounds, local_steps=ft.local_steps,
        planned_steps=entry.planned_steps, expected_batch_size=ft.batch_size, max_grad_norm=entry.max_grad_norm,
        noise_multiplicity=entry.noise_multiplicity)


def _affordable_rounds(sigma: float, q: float, local_steps: int, rounds: int, pv) -> int:
    from dpgen.privacy import accounting
    from dpgen.training.dp import dp_event

    for k in range(rounds, 0, -1):
        if accounting.epsilon([dp_event(sigma, q, k * local_steps)], pv.delta, pv.accountant,
                              pv.neighbouring) <= pv.epsilon:
            return k
    return 0


def plan_site(site: SiteRun) -> SitePlan:
    """Calibrate and register the site's plan (once; a restarted site must present the same
    plan). Refuses (SiteRefusal) when the budget cannot pay for the planned rounds. The
    messages stay at the site (it refuses before connecting anywhere)."""
    from dpgen.privacy.engine import PrivacyError
    from dpgen.training.dp import DPSettings, plan_mechanism, register_plan

    cfg, ft, pv = site.config, site.config.finetune, site.config.privacy
    units = _units(load_site_data(site))
    config = _run_config(site)
    settings = DPSettings.from_finetune(config.finetune)
    what = f"site {site.name}: epsilon {pv.epsilon:g} for {ft.rounds} round(s) x {ft.local_steps} steps"
    q = settings.batch_size / max(len(units), 1)
    try:
        entry = plan_mechanism(config, settings, units, mechanism=site_mechanism(), budget=pv.epsilon,
                               other_events=[], trains="diffusion UNet (federated site)",
                               federated={"site": site.name, "rounds": ft.rounds, "local_steps": ft.local_steps})
    except PrivacyError as err:
        if q > 1 or pv.delta * len(units) >= 1:  # not a calibration failure: the batch or delta
            raise SiteRefusal(f"site {site.name}: {err}") from None
        one = ft.rounds > 1
        if one:
            from dpgen.privacy import accounting

            try:
                accounting.calibrate_sigma(pv.epsilon, pv.delta, q, ft.local_steps, accountant=pv.accountant,
                                           neighbouring=pv.neighbouring)
            except ValueError:
                one = False
        if not one:
            raise SiteRefusal(f"{what}: the privacy budget is too small for one round ({err}); raise "
                              f"privacy.epsilon or lower finetune.local_steps") from None
        raise SiteRefusal(f"{what}: the privacy budget is too small for the planned rounds ({err}); "
                          f"lower finetune.rounds or raise privacy.epsilon") from None
    cap = ft.max_noise_multiplier
    if cap is not None and entry.sigma > cap:
        k = _affordable_rounds(cap, entry.sample_rate, ft.local_steps, ft.rounds, pv)
        if k == 0:
            raise SiteRefusal(f"{what}: the privacy budget is too small for one round at noise multiplier <= {cap:g} "
                              f"(finetune.max_noise_multiplier); raise privacy.epsilon or lower finetune.local_steps")
        raise SiteRefusal(f"{what} needs noise multiplier {entry.sigma:.3g} > finetune.max_noise_multiplier = {cap:g}; "
                          f"at {cap:g} the budget pays for {k} round(s): set finetune.rounds <= {k}")
    try:
        entry = register_plan(site.ledger, entry)
    except PrivacyError as err:
        raise SiteRefusal(f"site {site.name}: {err}") from None
    return SitePlan(entry, plan_facts(site, entry))


def registered_plan(site: SiteRun):
    """The site's registered PlanEntry (never recalibrated)."""
    from dpgen.privacy.schema import PlanEntry

    raw = site.ledger.latest("dp_plan", mechanism=site_mechanism())
    if raw is None:
        raise SiteRefusal(f"site {site.name}: no privacy plan in {site.rd.ledger_path}; start the site with "
                          f"`dpgen federated site`")
    return PlanEntry.model_validate(raw)


def _entries(ledger, kind: str) -> list[dict]:
    return [e for e in ledger.entries() if e.get("kind") == kind]


def _allocated_end(ledger) -> int:
    return max((int(e["last_step"]) for e in _entries(ledger, "fed_round_start")), default=0)


def _epsilon_at(entry, steps: int) -> float:
    """The site's epsilon after `steps` steps of its plan (its relation, its accountant)."""
    from dpgen.training.dp import loop_plan

    return 0.0 if steps <= 0 else loop_plan(entry).epsilon(steps, entry.accountant)


def _within(entry, steps: int) -> bool:
    return _epsilon_at(entry, steps) <= entry.target_epsilon * (1 + 1e-9)


def check_schema(site: SiteRun, schema: dict, ds=None) -> None:
    """The global model's public schema against the site's data (shape, label space, family)."""
    ds = ds if ds is not None else load_site_data(site)
    if schema["family"] != "diffusion":
        raise SiteRefusal(f"site {site.name}: the coordinator trains a {schema['family']!r} model; federated sites "
                          f"support 'diffusion'")
    shape = list(schema["spec"]["image_shape"])
    if list(ds.image_shape) != shape:
        raise SiteRefusal(f"site {site.name}: its images have shape {tuple(ds.image_shape)}, the global model takes "
                          f"{tuple(shape)}; this site cannot join (no resampling)")
    if len(ds.labels) and int(ds.labels.max()) >= int(schema["num_classes"]):
        raise SiteRefusal(f"site {site.name}: a label of its data is outside the federation's "
                          f"num_classes = {schema['num_classes']}")


def progress_facts(site: SiteRun, round_index: int | None = None):
    """The site's state as it tells the coordinator (SiteProgressFacts: nothing that depends on N;
    the exact epsilon only under replace-one neighbours)."""
    from dpgen.privacy.schema import SiteProgressFacts
    from dpgen.training.dp import spent_epsilon

    led, entry, mech = site.ledger, registered_plan(site), site_mechanism()
    cur = led.latest("dp_complete", mechanism=mech) or led.latest("dp_progress", mechanism=mech)
    steps = int(cur["steps_done"]) if cur else 0
    allocated = _allocated_end(led)
    preflights = [bool(e["passed"]) for e in _entries(led, "preflight") if e.get("mechanism") == mech]
    replace_one = entry.neighbouring == "replace_one"
    return SiteProgressFacts(
        site=site.name, round=round_index, neighbouring=entry.neighbouring, steps_done=steps,
        steps_allocated=allocated, planned_steps=entry.planned_steps,
        rounds_done=len({e["round"] for e in _entries(led, "fed_round_done")}),
        within_budget=_within(entry, max(steps, allocated)), noisy=entry.sigma > 0,
        preflight_passed=all(preflights) if preflights else None,
        complete=led.latest("dp_complete", mechanism=mech) is not None,
        epsilon_replace_one=(spent_epsilon(led, _run_config(site)) if steps else 0.0) if replace_one else None,
    )


def site_status(site: SiteRun, schema: dict, round_index: int) -> dict:
    """Whether the site will take round `round_index` of a model with `schema`, and its public
    facts. Never raises for a refusal: the reason goes back to the coordinator; `fatal` says
    the site can never join (wrong image shape, labels, data errors), not just not now. An
    unexpected error is reported by its type only (its message may name private paths or
    sizes); the site logs it."""
    entry = registered_plan(site)
    led = site.ledger
    out = {"site": site.name, "accept": True, "reason": "", "fatal": False,
           "plan": plan_facts(site, entry).model_dump(mode="json"),
           "progress": progress_facts(site, round_index).model_dump(mode="json")}
    try:
        try:
            check_schema(site, schema)
        except SiteRefusal:
            out["fatal"] = True  # this site can never join this federation
            raise
        if led.latest("dp_complete", mechanism=site_mechanism()) is not None:
            raise SiteRefusal(f"site {site.name}: its plan is complete (finished or stopped); it takes no more rounds")
        left = entry.planned_steps - _allocated_end(led)
        out["rounds_affordable"] = left // site.config.finetune.local_steps
        if left < site.config.finetune.local_steps:
            raise SiteRefusal(f"site {site.name}: round {round_index} would take it over its budget "
                              f"({_allocated_end(led)} of {entry.planned_steps} planned steps spent)")
    except SiteRefusal as err:
        out.update(accept=False, reason=str(err))
    except Exception as err:  # noqa: BLE001 - a data problem is a refusal; its message stays here
        print(f"[dpgen site {site.name}] cannot take part: {type(err).__name__}: {err}", flush=True)
        out.update(accept=False, fatal=True, reason=f"site {site.name}: its data cannot be used "
                                                    f"({type(err).__name__}; see the site's log)")
    return out


@dataclass
class RoundResult:
    update: Weights  # train_names -> (weights after the round) - (global weights)
    facts: object  # SiteProgressFacts after the round
    replayed: bool = False


# The module and objective the site trains, built once per process (keyed on the public model
# description) and given the global weights every round: one module object, one preflight.
_SITE_MODEL: dict[str, tuple] = {}


def _site_model(site: SiteRun, gm: GlobalModel, config):
    from dpgen.training.objectives import DiffusionObjective
    from dpgen.training.trainable import select_trainable

    key = json.dumps([str(site.root.resolve()), gm.family, gm.spec, gm.trainable, config.model.cond_drop_prob],
                     sort_keys=True, default=str)
    if key not in _SITE_MODEL:
        model = _build(gm.family, gm.spec)
        select_trainable(model, gm.trainable)
        _SITE_MODEL.clear()
        _SITE_MODEL[key] = (model, DiffusionObjective(model, config.model.cond_drop_prob))
    return _SITE_MODEL[key]


def local_round(site: SiteRun, gm: GlobalModel, round_index: int, *, device="cpu",
                progress: bool = False) -> RoundResult:
    """One round of the site's DP-SGD from the global weights (see the module docstring)."""
    import torch

    from dpgen.privacy.schema import FedRoundDoneEntry, FedRoundStartEntry
    from dpgen.training.dp import DPJob, DPSettings, run_dp_job
    from dpgen.training.families.shared import private_rows

    led, entry, ft, mech = site.ledger, registered_plan(site), site.config.finetune, site_mechanism()
    fp = gm.fingerprint
    update_path = site.rd.internal / "rounds" / f"round_{round_index:04d}.safetensors"

    # 1. The same round from the same global weights, already done: send the same update again.
    done = led.latest("fed_round_done", round=round_index, global_sha256=fp)
    if done is not None and update_path.is_file():
        update = arrays.load(update_path)
        if arrays.fingerprint(update, gm.train_names) == done["update_sha256"]:
            return RoundResult(update, progress_facts(site, round_index), replayed=True)

    ds = load_site_data(site)
    # A recomputed round reruns the same secret draws: refuse private data that changed since launch.
    site.rd.record_datasets({f"private/{ds.split}": ds.info()})
    check_schema(site, gm.schema(), ds)
    if led.latest("dp_complete", mechanism=mech) is not None:
        raise SiteRefusal(f"site {site.name}: its plan is complete; it takes no more rounds")
    units = _units(ds)

    # 2. Step indices of the plan for this round, recorded before any private data is used.
    start = led.latest("fed_round_start", round=round_index, global_sha256=fp)
    if start is None:
        first = _allocated_end(led)
        last = first + ft.local_steps
        if last > entry.planned_steps or not _within(entry, last):
            raise SiteRefusal(f"site {site.name}: round {round_index} would take it over its budget "
                              f"({first} of {entry.planned_steps} planned steps spent; epsilon "
                              f"{entry.target_epsilon:g})")
        start = led.append(FedRoundStartEntry(mechanism=mech, round=round_index, global_sha256=fp, first_step=first,
                                              last_step=last))
    first, last = int(start["first_step"]), int(start["last_step"])

    # 3. The site's module (built once per process) at the global weights, and its DP job.
    config = _run_config(site, model=gm.model_config, num_classes=gm.num_classes, trainable=gm.trainable)
    model, objective = _site_model(site, gm, config)
    model.load_state_dict({n: torch.from_numpy(np.array(gm.weights[n])) for n in gm.names})
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if names != gm.train_names:
        raise SiteRefusal(f"site {site.name}: its trainable selection ({len(names)} tensors) differs from the "
                          f"coordinator's ({len(gm.train_names)}); check the dpgen versions")
    job = DPJob(mech, model, objective, private_rows(ds, model.spec.attributes), DPSettings.from_finetune(config.finetune),
                entry, site.rd.checkpoints / ROUND_STATE, reuse_preflight=True)

    # 4. DP-SGD steps first..last of the registered plan (the one loop: preflight, secret
    #    Poisson sampling from this site's run directory, clipping, noise, progress entries).
    try:
        result = run_dp_job(config, site.rd, led, job, units, device, progress, first_step=first, last_step=last,
                            start_key=f"round {round_index} from global {fp}", complete=False)
    except BaseException:
        _SITE_MODEL.clear()  # after a failure the next round starts from a fresh module (and preflight)
        raise

    # 5. The update, kept in internal/ and sent (masked) to the coordinator.
    state = model.state_dict()
    update = {n: (state[n].detach().cpu().numpy().astype(np.float32) - gm.weights[n]) for n in gm.train_names}
    arrays.save(update_path, update, {"round": str(round_index), "global_sha256": fp})
    led.append(FedRoundDoneEntry(
        mechanism=mech, round=round_index, global_sha256=fp, first_step=first, last_step=last,
        update_sha256=arrays.fingerprint(update, gm.train_names),
        update_max_abs=float(max((np.abs(v).max() for v in update.values()), default=0.0)),
        epsilon_pld=result["epsilon"], final_loss=None if result["final_loss"] != result["final_loss"] else
        result["final_loss"], resumed_from=result["resumed_from"]))
    if last >= entry.planned_steps:
        finish_site(site, "all planned rounds done")
    return RoundResult(update, progress_facts(site, round_index))


def finish_site(site: SiteRun, reason: str):
    """The site's completion entry and reconstruction bound (`complete_mechanism`), for every
    step allocated to a round (all planned rounds, or fewer when the federation stopped first;
    an allocation abandoned half-way counts in full). Written once; returns the facts."""
    from dpgen.training.dp import complete_mechanism

    led, entry = site.ledger, registered_plan(site)
    if led.latest("dp_complete", mechanism=site_mechanism()) is None:
        cur = led.latest("dp_progress", mechanism=site_mechanism())
        steps = max(_allocated_end(led), int(cur["steps_done"]) if cur else 0)
        if steps > 0:
            complete_mechanism(_run_config(site), led, entry, _units(load_site_data(site)), steps)
            print(f"[dpgen site {site.name}] completion written after {steps} steps ({reason})", flush=True)
    return progress_facts(site)
