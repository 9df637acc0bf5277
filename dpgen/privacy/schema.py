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


class OtherEntry(_Entry):
    """Any other kind (stored verbatim, ignored by the accounting)."""


ENTRY_MODELS: dict[str, type[_Entry]] = {m.model_fields["kind"].default: m for m in (
    PlanEntry, PreflightEntry, ProgressEntry, CompleteEntry, ReleaseEntry, InternalRunEntry, ArtifactEntry, BoundEntry)}
LedgerEntry = Union[PlanEntry, PreflightEntry, ProgressEntry, CompleteEntry, ReleaseEntry, InternalRunEntry,
                    ArtifactEntry, BoundEntry, OtherEntry]


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


__all__ = ["ArtifactEntry", "BoundEntry", "CompleteEntry", "ENTRY_MODELS", "Event", "GaussianEvent", "InternalRunEntry",
           "LedgerEntry", "Neighbouring", "OtherEntry", "PlanEntry", "PoissonGaussianEvent", "PreflightEntry",
           "PrivacySource", "ProgressEntry", "ReleaseEntry", "Scope", "dump_entry", "parse_entry"]
