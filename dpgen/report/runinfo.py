"""Everything the release review reads from a run directory, read defensively.

The release bundle, the shareable report, the internal review and the sweep all start from
`load_run(RUN_DIR)`. Other stages write their outputs as files (the ledger, the evaluation and
the probes under internal/); this module reads those files into the typed schemas the writers
validate against (dpgen.privacy.schema for the ledger, dpgen.core.schemas for the evaluation and
the probes) and never imports the code that wrote them, so a stage that has not run (or a file
that does not parse) shows as "not run" / "unreadable" with a one-line note, never as a crash.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from dpgen.core.schemas import EvaluationResults, ProbesSummary
from dpgen.privacy.ledger import LedgerSummary, PrivacyLedger
from dpgen.privacy.schema import BoundEntry, LedgerEntry, PlanEntry, PreflightEntry
from dpgen.rundir import RunDir


def read_json(path: Path, what: str) -> tuple[Any, str | None]:
    """(object, None) or (None, a one-line note saying why there is none)."""
    path = Path(path)
    if not path.is_file():
        return None, f"not run ({what}: no {path.name})"
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return None, f"unreadable ({path.name}: {type(err).__name__}: {err})"
    if not isinstance(obj, dict):
        return None, f"unreadable ({path.name}: not a JSON object)"
    return obj, None


def read_typed(path: Path, what: str, schema: type[BaseModel]) -> tuple[Any, str | None]:
    """A file dpgen wrote, parsed into its schema (dpgen.core.schemas), or (None, a note)."""
    obj, note = read_json(path, what)
    if obj is None:
        return None, note
    try:
        return schema.model_validate(obj), None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return None, f"unreadable ({Path(path).name}: {where}: {first['msg']}; not the layout dpgen writes)"


def as_float(v: Any) -> float | None:
    """Numbers, and the strings "inf"/"-inf"/"nan" that strict-JSON writers use, as floats."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def fmt_num(v: Any, digits: int = 3) -> str:
    f = as_float(v)
    if f is None:
        return "-" if v is None else str(v)
    if math.isinf(f):
        return "∞" if f > 0 else "-∞"
    if math.isnan(f):
        return "nan"
    if f.is_integer() and abs(f) < 1e15:
        return str(int(f))
    if abs(f) >= 10 ** digits and abs(f) < 1e15:
        return f"{f:.0f}"
    return f"{f:.{digits}g}"


class AttrDict(dict):
    """A raw config section with attribute access: the fallback when config.yaml does not validate
    against this dpgen version's schema (e.g. a run written by an older or newer dpgen)."""

    def __getattr__(self, key: str) -> Any:
        try:
            v = self[key]
        except KeyError:
            raise AttributeError(key) from None
        return AttrDict(v) if isinstance(v, dict) else v


@dataclass
class RunInfo:
    """A run directory as the release review sees it."""

    root: Path
    config: Any = None  # RunConfig or None
    config_note: str | None = None
    state: dict = field(default_factory=dict)
    entries: list[dict] = field(default_factory=list)  # the raw ledger lines
    records: list[LedgerEntry] = field(default_factory=list)  # the same, typed
    privacy: LedgerSummary | None = None
    privacy_note: str | None = None
    evaluation: EvaluationResults | None = None  # internal: computed on private data without DP
    evaluation_note: str | None = None
    probes: ProbesSummary | None = None  # internal: computed on private data without DP
    probes_note: str | None = None
    manifest: dict = field(default_factory=dict)

    @property
    def rd(self) -> RunDir:
        return RunDir(self.root)

    # ------------------------------------------------------------ ledger views
    def latest(self, kind: str, **match) -> dict | None:
        for e in reversed(self.entries):
            if e.get("kind") == kind and all(e.get(k) == v for k, v in match.items()):
                return e
        return None

    @property
    def plans(self) -> dict[str, PlanEntry]:
        return {r.mechanism: r for r in self.records if isinstance(r, PlanEntry)}

    def preflights(self) -> dict[str, PreflightEntry]:
        return {r.mechanism: r for r in self.records if isinstance(r, PreflightEntry)}

    def bound(self) -> BoundEntry | None:
        """The latest reconstruction bound: the composition of every release mechanism so far."""
        bounds = [r for r in self.records if isinstance(r, BoundEntry)]
        return bounds[-1] if bounds else None

    @property
    def epsilon(self) -> float | None:
        return None if self.privacy is None else self.privacy.epsilon

    @property
    def delta(self) -> float | None:
        if self.privacy is not None:
            return self.privacy.delta
        return as_float(getattr(getattr(self.config, "privacy", None), "delta", None))

    @property
    def budget(self) -> float | None:
        """The run's one privacy budget (privacy.epsilon)."""
        if self.privacy is not None and self.privacy.target_epsilon is not None:
            return self.privacy.target_epsilon
        return as_float(getattr(getattr(self.config, "privacy", None), "epsilon", None))

    @property
    def neighbouring(self) -> str:
        if self.privacy is not None:
            return self.privacy.neighbouring
        return str(getattr(getattr(self.config, "privacy", None), "neighbouring", "add_remove"))

    @property
    def name(self) -> str:
        return getattr(self.config, "name", None) or self.root.name

    def is_done(self, stage: str) -> bool:
        return stage in (self.state.get("completed") or {})

    def unfinished(self) -> list[str]:
        """Why the run is not finished (empty when it is): stages, DP mechanisms, the cohort."""
        problems = []
        for stage in ("pretrain", "finetune", "sample"):
            if not self.is_done(stage):
                problems.append(f"stage {stage!r} has not finished (state.json)")
        if not self.rd.cohort_file.is_file():
            problems.append(f"no cohort at {self.rd.cohort_file.relative_to(self.root)}")
        if self.privacy is not None:
            for name, m in self.privacy.mechanisms.items():
                if m.scope == "release" and not m.complete:
                    problems.append(f"DP mechanism {name!r} is not complete in the ledger "
                                    f"({m.steps_done}/{m.planned_steps} steps)")
        elif self.entries:
            problems.append(f"the privacy ledger cannot be read ({self.privacy_note})")
        return problems


def load_run(run_dir: str | Path) -> RunInfo:
    """Read a run directory; raise FileNotFoundError only if it is not one at all."""
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such run directory")
    rd = RunDir(root)
    info = RunInfo(root=root)
    if not rd.config_path.is_file() and not rd.ledger_path.is_file():
        raise FileNotFoundError(f"{root}: not a dpgen run directory (no config.yaml, no privacy/ledger.jsonl)")
    try:
        info.config = rd.load_config()
    except Exception as err:  # noqa: BLE001 - any config problem becomes a note
        import yaml

        try:
            raw = yaml.safe_load(rd.config_path.read_text()) if rd.config_path.is_file() else None
        except (OSError, yaml.YAMLError):
            raw = None
        if isinstance(raw, dict) and isinstance(raw.get("data"), dict) and isinstance(raw.get("privacy"), dict):
            info.config = AttrDict(raw)
            info.config_note = ("config.yaml does not validate against this dpgen version's schema ("
                                + " ".join(str(err).split())[:300] + "); its values are read as written")
        else:
            info.config_note = f"config.yaml unreadable: {' '.join(str(err).split())[:300]}"
    info.state, _ = read_json(rd.state_path, "state")
    info.state = info.state or {"completed": {}}
    info.manifest, _ = read_json(rd.manifest_path, "manifest")
    info.manifest = info.manifest or {}
    ledger = PrivacyLedger(rd.ledger_path)
    info.entries = ledger.entries()
    if not info.entries:
        info.privacy_note = "no privacy ledger entries"
    else:
        try:
            info.records = ledger.records()
            delta = None
            if not info.plans and info.config is not None:
                delta = as_float(getattr(info.config.privacy, "delta", None))
            info.privacy = ledger.summary(delta)
        except Exception as err:  # noqa: BLE001 - a ledger the review cannot read is a finding, not a crash
            info.privacy_note = f"the ledger cannot be read: {err}"
    info.evaluation, info.evaluation_note = read_typed(rd.evaluation_file, "dpgen evaluate", EvaluationResults)
    info.probes, info.probes_note = read_typed(rd.probes_summary_file, "dpgen audit", ProbesSummary)
    return info


__all__ = ["AttrDict", "RunInfo", "load_run", "read_json", "read_typed", "as_float", "fmt_num"]
