"""The privacy ledger's entries as typed records (pydantic), keyed on `kind`.

What may be released is decided from these fields, never from prose: an artifact carries a
`PrivacySource` ({kind: dp | post_processing | public | user, mechanisms: [...]}) whose
mechanism names are the constants of `dpgen.privacy.mechanisms`, and `releasable()` checks
that every mechanism it names has a completed, noisy entry in the same ledger.

Entries of a kind this module does not know are kept (as `OtherEntry`) and ignored by the
accounting; entries of a known kind must validate, on write and on read.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dpgen.privacy.mechanisms import KNOWN_MECHANISMS, scope_of

Scope = Literal["release", "internal"]
Neighbouring = Literal["add_remove", "replace_one"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------- accounting events


class PoissonGaussianEvent(_Strict):
    """`steps` compositions of the Poisson-subsampled Gaussian mechanism (DP-SGD)."""

    type: Literal["poisson_gaussian"] = "poisson_gaussian"
    sigma: float = Field(ge=0)  # noise std / clipping norm; 0 = no noise (epsilon inf)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=0)


class GaussianEvent(_Strict):
    """`count` Gaussian releases of a statistic of L2 sensitivity 1 (noise std `sigma`)."""

    type: Literal["gaussian"] = "gaussian"
    sigma: float = Field(ge=0)
    count: int = Field(default=1, ge=0)


Event = Annotated[Union[PoissonGaussianEvent, GaussianEvent], Field(discriminator="type")]


def _finite_sigma(ev: BaseModel) -> BaseModel:
    if not math.isfinite(ev.sigma):
        raise ValueError("sigma must be finite")
    return ev


# ----------------------------------------------------------------------------- privacy sources


class PrivacySource(_Strict):
    """Where an artifact's privacy comes from.

    - dp: an output of the named DP mechanisms;
    - post_processing: computed from outputs of the named DP mechanisms (and public data or
      user choices) only;
    - public: public data only (no private data at all);
    - user: a choice of the user, no data.
    """

    kind: Literal["dp", "post_processing", "public", "user"]
    mechanisms: tuple[str, ...] = ()
    note: str = ""

    @model_validator(mode="after")
    def _mechanisms_match_kind(self) -> "PrivacySource":
        if self.kind in ("dp", "post_processing"):
            if not self.mechanisms:
                raise ValueError(f"a {self.kind!r} privacy source must name the DP mechanisms it depends on")
            unknown = [m for m in self.mechanisms if m not in KNOWN_MECHANISMS]
            if unknown:
                raise ValueError(f"unknown DP mechanism {unknown[0]!r} in a privacy source")
        elif self.mechanisms:
            raise ValueError(f"a {self.kind!r} privacy source depends on no DP mechanism, but names {list(self.mechanisms)}")
        return self

    def describe(self) -> str:
        what = {"dp": "DP output of", "post_processing": "post-processing of", "public": "public data",
                "user": "user choice (no data)"}[self.kind]
        return f"{what} {', '.join(self.mechanisms)}".strip() + (f" ({self.note})" if self.note else "")


# ----------------------------------------------------------------------------- entries


class _Entry(BaseModel):
    """Fields every entry has; `seq` and `time` are set by the ledger when it appends."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str
    seq: int | None = None
    time: str | None = None


class _MechanismEntry(_Entry):
    mechanism: str

    @field_validator("mechanism")
    @classmethod
    def _known(cls, v: str) -> str:
        scope_of(v)  # raises for a name dpgen does not know
        return v


class PlanEntry(_MechanismEntry):
    """The plan of one DP-SGD mechanism, written once before it touches private data."""

    kind: Literal["dp_plan"] = "dp_plan"
    scope: Scope = "release"
    trains: str | None = None
    unit: str
    n_units: int = Field(gt=0)
    # The public unit count the sample rate is computed from (q = expected batch / it); None: q
    # came from n_units (replace-one, where N is public, or an internal mechanism).
    public_unit_count: int | None = Field(default=None, gt=0)
    target_epsilon: float = Field(gt=0)  # the run's budget (one per run)
    delta: float = Field(gt=0, lt=1)
    neighbouring: Neighbouring = "add_remove"
    sigma: float = Field(ge=0)
    sample_rate: float = Field(gt=0, le=1)
    expected_batch_size: float = Field(gt=0)
    planned_steps: int = Field(gt=0)
    max_grad_norm: float = Field(gt=0)
    noise_multiplicity: int = Field(default=1, gt=0)
    accountant: Literal["pld", "rdp"] = "pld"
    epsilon_planned_pld: float
    epsilon_planned_rdp: float | None = None
    other_events: list[Event] = Field(default_factory=list)
    poisson_sampling: Literal[True] = True
    grad_sample_mode: str = "hooks"

    @property
    def event(self) -> PoissonGaussianEvent:
        return PoissonGaussianEvent(sigma=self.sigma, sample_rate=self.sample_rate, steps=self.planned_steps)


class PreflightEntry(_MechanismEntry):
    kind: Literal["preflight"] = "preflight"
    mode: str
    passed: bool
    max_relative_error: float


class ProgressEntry(_MechanismEntry):
    """Steps done so far (the event covers all of them: not an increment)."""

    kind: Literal["dp_progress"] = "dp_progress"
    steps_done: int = Field(ge=0)
    event: PoissonGaussianEvent
    epsilon_pld: float | None = None
    delta: float | None = None


class CompleteEntry(ProgressEntry):
    kind: Literal["dp_complete"] = "dp_complete"  # type: ignore[assignment]
    sigma: float = Field(ge=0)
    sample_rate: float = Field(gt=0, le=1)
    max_grad_norm: float = Field(gt=0)
    unit: str
    epsilon_rdp: float | None = None
    target_epsilon: float | None = None
    world_size: int = 1


class ReleaseEntry(_Entry):
    """A DP statistic released beside the model (e.g. the label histogram)."""

    kind: Literal["dp_release"] = "dp_release"
    name: str  # the mechanism's constant, e.g. gaussian:label_histogram
    event: Event
    unit: str | None = None
    values: Any = None

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        scope_of(v)
        return v


class InternalRunEntry(_MechanismEntry):
    """An internal DP mechanism (the evaluation's DP classifiers): recorded with its own cost,
    never composed into a release, because nothing it outputs leaves internal/."""

    kind: Literal["dp_internal"] = "dp_internal"
    event: PoissonGaussianEvent
    repeats: int = Field(default=1, gt=0)  # independent runs (classifier seeds), each with this event
    epsilon_each: float
    delta: float
    neighbouring: Neighbouring = "add_remove"
    outputs: str  # where its results are (under internal/)

    @model_validator(mode="after")
    def _internal(self) -> "InternalRunEntry":
        if scope_of(self.mechanism) != "internal":
            raise ValueError(f"{self.mechanism} is a release mechanism; record it with a plan, not as internal")
        if not self.outputs.startswith("internal/"):
            raise ValueError("an internal mechanism's outputs must live under internal/")
        return self


class ArtifactEntry(_Entry):
    """A file the run produced, and where its privacy comes from."""

    kind: Literal["artifact"] = "artifact"
    name: str
    path: str
    privacy_source: PrivacySource


class BoundEntry(_Entry):
    """A reconstruction-robustness bound of the composition of `mechanisms`."""

    kind: Literal["bound"] = "bound"
    mechanisms: list[str]
    unit: str | None = None
    bound: dict
    bound_gdp: dict | None = None


# ----------------------------------------------------------------------------- federated fine-tuning
#
# A federation (dpgen.federated) has one ledger per site and one for the coordinator. A site's
# ledger is an ordinary run's ledger (its own plan of `dp_sgd:finetune`, preflights, progress,
# completion, bound) plus the rounds it took (`fed_round_start` before any step of a round,
# `fed_round_done` after it). The coordinator spends no privacy of its own: its ledger holds what
# the sites *reported* (their plans and states, as the facts below), the rounds it aggregated and
# the sites that refused, typed here so that a release is decided on fields, never on prose.
#
# What a site reports never depends on its number of privacy units N: under add/remove
# neighbours N is secret, and the sample rate q = batch / N, the noise multiplier sigma
# (calibrated from q) and the exact spent epsilon (a function of q) would each reveal it. A site
# reports its budget and what its accountant guarantees (spent <= budget), its user choices
# (rounds, local steps, expected batch, clipping norm) and its progress in steps; the exact
# epsilon only when its relation is replace-one (N public by its data holder's choice).

#: Where the coordinator's figures about a site come from.
REPORTED_BY_SITE = "reported by the site (its own accountant and ledger); the coordinator cannot verify it"


class SitePlanFacts(_Strict):
    """A site's plan as it tells the coordinator (at every status query): no N, q or sigma."""

    site: str
    unit: str  # "per image" | "per subject"
    target_epsilon: float = Field(gt=0)  # the site's budget for all its rounds
    delta: float = Field(gt=0, lt=1)
    neighbouring: Neighbouring = "add_remove"
    accountant: Literal["pld", "rdp"] = "pld"
    rounds: int = Field(gt=0)
    local_steps: int = Field(gt=0)
    planned_steps: int = Field(gt=0)  # rounds x local_steps
    expected_batch_size: int = Field(gt=0)  # a user choice; also the site's public FedAvg weight
    max_grad_norm: float = Field(gt=0)
    noise_multiplicity: int = Field(default=1, gt=0)
    poisson_sampling: Literal[True] = True


class SiteProgressFacts(_Strict):
    """A site's state as it tells the coordinator (after a round, at a status query, at the end).

    Every field is a count of steps or rounds, a user choice, or a yes/no the site's accountant
    and preflight answer; `epsilon_replace_one` (its exact spent epsilon) only for a site whose
    relation is replace-one."""

    site: str
    round: int | None = None
    neighbouring: Neighbouring = "add_remove"
    steps_done: int = Field(ge=0)  # DP-SGD steps of its plan that ran (as its ledger's progress says)
    steps_allocated: int = Field(ge=0)  # steps of its plan given to rounds so far (spent or abandoned)
    planned_steps: int = Field(gt=0)
    rounds_done: int = Field(ge=0)
    within_budget: bool  # its accountant: the epsilon of every allocated step is <= its budget
    noisy: bool  # its DP-SGD adds noise (sigma > 0)
    preflight_passed: bool | None  # its per-sample-gradient preflight (None: no round ran yet)
    complete: bool  # its ledger holds the completion entry of its mechanism
    epsilon_replace_one: float | None = None

    @model_validator(mode="after")
    def _no_epsilon_under_add_remove(self) -> "SiteProgressFacts":
        if self.epsilon_replace_one is not None and self.neighbouring != "replace_one":
            raise ValueError("a site under add/remove neighbours reports no exact epsilon (it is a function of N)")
        return self


class SecureAggregationFacts(_Strict):
    enabled: bool
    protocol: str | None = None
    num_shares: int | float | None = None
    reconstruction_threshold: int | float | None = None
    clipping_range: float | None = None
    quantization_range: int | None = None
    max_weight: float | None = None


class _FedEntry(_Entry):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FedSitePlanEntry(_FedEntry):
    """Coordinator: a site's plan, when it first answered a status query."""

    kind: Literal["fed_site_plan"] = "fed_site_plan"
    site: str
    first_round: int
    plan: SitePlanFacts
    source: str = REPORTED_BY_SITE


class FedSiteRefusedEntry(_FedEntry):
    """Coordinator: a site that would not take a round, and the reason it gave."""

    kind: Literal["fed_site_refused"] = "fed_site_refused"
    site: str | None
    round: int
    reason: str
    fatal: bool  # it can never join (image shape, labels, no secure aggregation), not just not now


class FedSiteProgressEntry(_FedEntry):
    """Coordinator: a site's reported state after a round it contributed to."""

    kind: Literal["fed_site_progress"] = "fed_site_progress"
    site: str
    round: int
    progress: SiteProgressFacts
    secagg_clipped_entries: int | None = None  # entries of its update SecAgg+ clipped (a function of its DP update)
    replayed: bool = False  # it sent the update it had computed for this round before (no new steps)
    source: str = REPORTED_BY_SITE


class FedRoundEntry(_FedEntry):
    """Coordinator: an aggregated (committed) round."""

    kind: Literal["fed_round"] = "fed_round"
    round: int
    attempt: int
    sites: list[str]
    weights: dict[str, int]  # public FedAvg weights: each site's configured expected batch size
    weighting: str = "FedAvg weighted by the sites' configured expected batch sizes (public)"
    secure_aggregation: SecureAggregationFacts
    dropped: list[str] = Field(default_factory=list)
    global_before: str
    global_after: str
    checkpoint: str
    checkpoint_sha256: str


class FedRoundFailedEntry(_FedEntry):
    """Coordinator: a round that was not aggregated, and why."""

    kind: Literal["fed_round_failed"] = "fed_round_failed"
    round: int
    attempt: int
    reason: str
    selected: list[str]
    contributed: list[str]  # sent an update (masked, with SecAgg+) that was not aggregated
    failures: list[str] = Field(default_factory=list)
    stages: list[dict] = Field(default_factory=list)  # per message stage: which sites it went to, which answered


class FedSiteFinalEntry(_FedEntry):
    """Coordinator: a site's state when the federation finished. `confirmed`: the site answered
    the finish message (it wrote its completion entry); else its last report is recorded."""

    kind: Literal["fed_site_final"] = "fed_site_final"
    site: str
    progress: SiteProgressFacts | None
    confirmed: bool
    source: str = REPORTED_BY_SITE


class FedFinishedEntry(_FedEntry):
    """Coordinator: the federation finished; the global model of `checkpoint` is final. With the
    `fed_site_final` entries of the contributing sites this completes `dp_sgd:federated_finetune`."""

    kind: Literal["fed_finished"] = "fed_finished"
    mechanism: Literal["dp_sgd:federated_finetune"] = "dp_sgd:federated_finetune"
    rounds: int = Field(ge=0)
    sites: list[str]  # every site that contributed to a committed round
    checkpoint: str


class _FedRoundSteps(_FedEntry):
    """A site's round and the step indices [first_step, last_step) of its plan it covers."""

    mechanism: str
    round: int
    global_sha256: str
    first_step: int = Field(ge=0)
    last_step: int = Field(gt=0)


class FedRoundStartEntry(_FedRoundSteps):
    """Site: the step indices [first_step, last_step) of its plan given to a round, written
    before the round's first DP-SGD step (an allocation abandoned half-way stays spent)."""

    kind: Literal["fed_round_start"] = "fed_round_start"


class FedRoundDoneEntry(_FedRoundSteps):
    """Site: a round's DP-SGD steps ran; its update (kept in internal/rounds/) was computed."""

    kind: Literal["fed_round_done"] = "fed_round_done"
    update_sha256: str
    update_max_abs: float
    epsilon_pld: float  # the site's own spent epsilon after the round (stays in its ledger)
    final_loss: float | None = None
    resumed_from: int = 0


FED_COORDINATOR_KINDS = ("fed_site_plan", "fed_site_refused", "fed_site_progress", "fed_round", "fed_round_failed",
                         "fed_site_final", "fed_finished")


class OtherEntry(_Entry):
    """Any other kind (stored verbatim, ignored by the accounting)."""


FED_ENTRIES = (FedSitePlanEntry, FedSiteRefusedEntry, FedSiteProgressEntry, FedRoundEntry, FedRoundFailedEntry,
               FedSiteFinalEntry, FedFinishedEntry, FedRoundStartEntry, FedRoundDoneEntry)
ENTRY_MODELS: dict[str, type[_Entry]] = {m.model_fields["kind"].default: m for m in (
    PlanEntry, PreflightEntry, ProgressEntry, CompleteEntry, ReleaseEntry, InternalRunEntry, ArtifactEntry, BoundEntry,
    *FED_ENTRIES)}
LedgerEntry = Union[PlanEntry, PreflightEntry, ProgressEntry, CompleteEntry, ReleaseEntry, InternalRunEntry,
                    ArtifactEntry, BoundEntry, FedSitePlanEntry, FedSiteRefusedEntry, FedSiteProgressEntry,
                    FedRoundEntry, FedRoundFailedEntry, FedSiteFinalEntry, FedFinishedEntry, FedRoundStartEntry,
                    FedRoundDoneEntry, OtherEntry]


def parse_entry(raw: dict | BaseModel) -> LedgerEntry:
    """Validate one entry (a dict from a file, or a model) into its typed record."""
    if isinstance(raw, _Entry):
        return raw
    if not isinstance(raw, dict):
        raise ValueError(f"a ledger entry must be a dict, got {type(raw).__name__}")
    kind = raw.get("kind")
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"a ledger entry needs a non-empty string 'kind': {raw!r}")
    model = ENTRY_MODELS.get(kind, OtherEntry)
    try:
        entry = model.model_validate(raw)
    except ValidationError as err:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'entry'}: {e['msg']}" for e in err.errors()[:4]]
        raise ValueError(f"invalid {kind!r} ledger entry: {'; '.join(problems)}") from None
    for ev in _events_of(entry):
        _finite_sigma(ev)
    return entry


def _events_of(entry: BaseModel) -> list[BaseModel]:
    ev = getattr(entry, "event", None)
    return [ev] if isinstance(ev, (PoissonGaussianEvent, GaussianEvent)) else []


def dump_entry(entry: BaseModel) -> dict:
    return entry.model_dump(mode="json", exclude_none=False)


__all__ = ["ArtifactEntry", "BoundEntry", "CompleteEntry", "ENTRY_MODELS", "Event", "FED_COORDINATOR_KINDS",
           "FedFinishedEntry", "FedRoundDoneEntry", "FedRoundEntry", "FedRoundFailedEntry", "FedRoundStartEntry",
           "FedSiteFinalEntry", "FedSitePlanEntry", "FedSiteProgressEntry", "FedSiteRefusedEntry", "GaussianEvent",
           "InternalRunEntry", "LedgerEntry", "REPORTED_BY_SITE", "SecureAggregationFacts", "SitePlanFacts",
           "SiteProgressFacts", "Neighbouring", "OtherEntry", "PlanEntry", "PoissonGaussianEvent", "PreflightEntry",
           "PrivacySource", "ProgressEntry", "ReleaseEntry", "Scope", "dump_entry", "parse_entry"]
