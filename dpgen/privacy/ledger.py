"""The privacy ledger: an append-only JSON-lines record of everything a run spent.

Why a ledger
------------
A synthetic cohort is only as private as the sum of everything that touched the
private data.  Training may crash and resume, a label histogram may be released
separately, artifacts are derived from several sources.  The ledger keeps one
line per fact, never rewrites a line, and the reported epsilon is always
*recomputed* from the accounting events it holds (see ``accounting.py``), so a
reviewer can re-derive every number from the file alone.

File format
-----------
``RUN_DIR/privacy/ledger.jsonl``; one JSON object per line.  ``append`` adds
``"seq"`` (1, 2, 3, ... in file order) and ``"time"`` (ISO-8601, UTC), writes the
line with ``open(path, "a")``, flushes and fsyncs before returning, under an
exclusive ``flock`` so concurrent writers cannot interleave.  A crash can at worst
leave a truncated *last* line; readers ignore it with a warning and the next
append first terminates it with a newline, so earlier bytes are never changed.

Entry kinds
-----------
Typed records (pydantic models keyed on ``kind``) in :mod:`dpgen.privacy.schema`:
``dp_plan`` (one per DP-SGD mechanism, before it touches private data: sigma, sample rate,
steps, clipping norm, unit, budget, neighbouring relation, scope), ``preflight``,
``dp_progress`` (cumulative steps done; written at checkpoints), ``dp_complete``,
``dp_release`` (a DP statistic released beside the model: its event and values),
``dp_internal`` (an internal DP mechanism, e.g. the evaluation's DP classifiers: recorded
with its own cost, composed into nothing released), ``artifact`` (a file and its typed
``PrivacySource``), ``bound`` (a reconstruction bound of the composition of the named
mechanisms). An entry of a known kind must validate on append and on read; other kinds are
kept verbatim and ignored by the accounting.

What is spent
-------------
``events()``: for each *release-scope* mechanism, the ``event`` of its latest
``dp_progress`` or ``dp_complete`` entry (each carries the cumulative steps, so a resumed
run that re-logs progress is never double counted), plus the ``event`` of every
``dp_release`` entry. All of them are composed in one accountant, for the neighbouring
relation the plans name. A run has one budget (``privacy.epsilon``): every plan carries it.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel

from dpgen.distributed import is_writer
from dpgen.privacy import accounting
from dpgen.privacy.mechanisms import scope_of
from dpgen.privacy.schema import (
    ArtifactEntry, BoundEntry, CompleteEntry, InternalRunEntry, LedgerEntry, PlanEntry, PreflightEntry, ProgressEntry,
    ReleaseEntry, dump_entry, parse_entry,
)

__all__ = ["ENTRY_KINDS", "LEDGER_RELPATH", "LedgerError", "LedgerSummary", "MechanismState", "PrivacyLedger",
           "format_ledger", "ledger_path"]

ENTRY_KINDS = ("dp_plan", "preflight", "dp_progress", "dp_complete", "dp_release", "dp_internal", "artifact", "bound")
LEDGER_RELPATH = Path("privacy") / "ledger.jsonl"
_RESERVED = ("seq", "time")


class LedgerError(ValueError):
    """A malformed ledger entry."""


def ledger_path(run_dir: str | os.PathLike) -> Path:
    """Where a run directory keeps its ledger."""
    return Path(run_dir) / LEDGER_RELPATH


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays and paths show up in entries built by training code
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"ledger entries must be JSON-serialisable; got {type(obj).__name__}: {obj!r}")


def _parse_lines(data: bytes, path: Path) -> list[dict]:
    entries: list[dict] = []
    lines = data.split(b"\n")
    # data ending in b"\n" gives a final empty element; anything else is an unterminated last line
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        is_last = i == len(lines) - 1
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError):
            if is_last:
                warnings.warn(
                    f"{path}: ignoring a truncated last line ({len(raw)} bytes), "
                    "probably from a crash during an append",
                    RuntimeWarning,
                    stacklevel=3,
                )
            else:
                warnings.warn(
                    f"{path}: ignoring unreadable line {i + 1} ({len(raw)} bytes), "
                    "probably an append interrupted by a crash and sealed by a later append",
                    RuntimeWarning,
                    stacklevel=3,
                )
            continue
        entries.append(obj)
    return entries


class PrivacyLedger:
    """Append-only JSON-lines privacy ledger of one run (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def for_run(cls, run_dir: str | os.PathLike) -> "PrivacyLedger":
        return cls(ledger_path(run_dir))

    def __repr__(self) -> str:
        return f"PrivacyLedger({str(self.path)!r})"

    def exists(self) -> bool:
        return self.path.is_file()

    # ------------------------------------------------------------------ writing

    @staticmethod
    def _validate(entry: dict | BaseModel) -> dict:
        """The entry as a validated JSON-able dict (a broken entry fails in the code that wrote it)."""
        if isinstance(entry, BaseModel):
            entry = dump_entry(entry)
            entry = {k: v for k, v in entry.items() if k not in _RESERVED or v is not None}
        if not isinstance(entry, dict):
            raise LedgerError(f"a ledger entry must be a dict, got {type(entry).__name__}")
        clash = [k for k in _RESERVED if k in entry]
        if clash:
            raise LedgerError(f"{clash} are set by the ledger itself and must not be in the entry")
        try:
            parse_entry(entry)
        except ValueError as err:
            raise LedgerError(str(err)) from None
        return entry

    def append(self, entry: dict | BaseModel) -> dict:
        """Append one entry durably (validated against its kind's schema); return it with its
        ``seq`` and ``time``.

        The line is written in one ``write`` on an O_APPEND handle, flushed and
        fsynced before this returns, so once ``append`` returns the entry survives
        a crash, and a crash during ``append`` cannot damage earlier lines.
        """
        entry = self._validate(entry)
        json.dumps(entry, default=_json_default)  # fail before touching the file
        if not is_writer():  # distributed fine-tuning: only rank 0 appends (one line per fact)
            return dict(entry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        with open(self.path, "a", encoding="utf-8") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                seq, needs_newline = self._tail_state()
                record = dict(entry)
                record["seq"] = seq + 1
                record["time"] = datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
                line = json.dumps(record, default=_json_default, ensure_ascii=False)
                if "\n" in line:  # cannot happen with json.dumps, but the format depends on it
                    raise LedgerError("serialised entry contains a newline")
                if needs_newline:
                    warnings.warn(
                        f"{self.path}: the last line was truncated (crash during an append?); "
                        "terminating it before appending",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                fh.write(("\n" if needs_newline else "") + line + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        if created:
            # make the new directory entry itself durable
            try:
                dfd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError:  # pragma: no cover - e.g. filesystems without directory fsync
                pass
        return record

    def _tail_state(self) -> tuple[int, bool]:
        """(largest seq so far, whether the file ends without a newline).

        Reads only the tail of the file in the common case, so appends stay cheap
        for long ledgers with many progress entries.
        """
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return 0, False
        if size == 0:
            return 0, False
        with open(self.path, "rb") as fh:
            chunk = 1 << 16
            while True:
                start = max(0, size - chunk)
                fh.seek(start)
                data = fh.read(size - start)
                needs_newline = not data.endswith(b"\n")
                lines = data.split(b"\n")
                if start > 0:
                    lines = lines[1:]  # the first piece may be a partial line
                for raw in reversed(lines):
                    try:
                        obj = json.loads(raw)
                    except (ValueError, UnicodeDecodeError):
                        continue
                    if isinstance(obj, dict) and isinstance(obj.get("seq"), int):
                        return obj["seq"], needs_newline
                if start == 0:
                    return 0, needs_newline
                chunk *= 4

    # ------------------------------------------------------------------ reading

    def entries(self) -> list[dict]:
        """All readable entries in file order ([] if the ledger does not exist yet)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        return _parse_lines(data, self.path)

    def latest(self, kind: str, **match: Any) -> dict | None:
        """The last entry of ``kind`` whose fields equal all of ``match``."""
        for entry in reversed(self.entries()):
            if entry.get("kind") == kind and all(entry.get(k, _MISSING) == v for k, v in match.items()):
                return entry
        return None

    def records(self) -> list[LedgerEntry]:
        """All entries as typed records; a line of a known kind that does not validate is an
        error (a release must never be decided on an entry it cannot read)."""
        out = []
        for e in self.entries():
            try:
                out.append(parse_entry(e))
            except ValueError as err:
                raise LedgerError(f"{self.path}: entry #{e.get('seq', '?')}: {err}") from None
        return out

    def events(self) -> list[dict]:
        """The accounting events of everything released so far (see module docstring)."""
        return _release_events(self.records())

    def summary(self, delta: float | None = None) -> "LedgerSummary":
        """Privacy spent by the run, recomputed from the ledger's events.

        ``delta`` defaults to the delta of the dp_plan entries (which must agree).
        """
        return LedgerSummary.of(self.records(), self.path, delta)


def _latest_state(records: list[LedgerEntry]) -> dict[str, ProgressEntry]:
    """The latest progress/complete entry of each mechanism."""
    state: dict[str, ProgressEntry] = {}
    for r in records:
        if isinstance(r, ProgressEntry):  # CompleteEntry is a ProgressEntry
            state[r.mechanism] = r
    return state


def _release_events(records: list[LedgerEntry]) -> list[dict]:
    events = [s.event.model_dump() for name, s in _latest_state(records).items() if scope_of(name) == "release"]
    events += [r.event.model_dump() for r in records if isinstance(r, ReleaseEntry) and scope_of(r.name) == "release"]
    return events


@dataclass(frozen=True)
class MechanismState:
    """One DP-SGD mechanism of a run, as the ledger shows it."""

    name: str
    scope: str
    unit: str | None
    n_units: int | None
    sigma: float | None
    sample_rate: float | None
    max_grad_norm: float | None
    noise_multiplicity: int | None
    planned_steps: int | None
    steps_done: int
    complete: bool
    preflight_passed: bool | None
    target_epsilon: float | None
    epsilon_planned_pld: float | None


@dataclass(frozen=True)
class LedgerSummary:
    """What a run spent, recomputed from its ledger. `epsilon` is the PLD composition of every
    release-scope mechanism for the relation the plans state (`neighbouring`); both relations'
    figures are given too (`epsilon_add_remove`, `epsilon_replace_one`)."""

    ledger: str
    delta: float
    neighbouring: str
    epsilon: float
    epsilon_rdp: float | None
    epsilon_add_remove: float
    epsilon_replace_one: float
    target_epsilon: float | None
    within_target: bool | None
    budget_problem: str | None
    unit: str | None
    n_units: int | None
    mechanisms: dict[str, MechanismState]
    releases: list[ReleaseEntry]
    internal: list[InternalRunEntry]
    artifacts: list[ArtifactEntry]
    bounds: list[BoundEntry]
    events: list[dict]
    n_entries: int

    @property
    def non_private(self) -> bool:
        return math.isinf(self.epsilon)

    @property
    def release_mechanisms(self) -> list[str]:
        """Every release-scope mechanism (DP-SGD and DP releases) the ledger names."""
        return sorted({n for n, m in self.mechanisms.items() if m.scope == "release"} | {r.name for r in self.releases})

    @classmethod
    def of(cls, records: list[LedgerEntry], path: Path, delta: float | None = None) -> "LedgerSummary":
        plans = {r.mechanism: r for r in records if isinstance(r, PlanEntry)}
        release_plans = [p for p in plans.values() if p.scope == "release"]
        problems = []
        if delta is None:
            deltas = {p.delta for p in release_plans}
            if len(deltas) != 1:
                raise ValueError(
                    "summary needs delta: "
                    + ("the ledger has no dp_plan with a delta" if not deltas else f"the plans disagree on delta {sorted(deltas)}")
                )
            delta = float(deltas.pop())
        relations = {p.neighbouring for p in release_plans}
        if len(relations) > 1:
            problems.append(f"the plans disagree on the neighbouring relation ({sorted(relations)})")
        neighbouring = "replace_one" if "replace_one" in relations else "add_remove"  # the stronger claim's relation
        targets = {p.target_epsilon for p in release_plans}
        if len(targets) > 1:
            problems.append(f"the plans disagree on the run's budget (target epsilons {sorted(targets)}); a run has one")
        target = max(targets) if len(targets) == 1 else (min(targets) if targets else None)

        state = _latest_state(records)
        preflights: dict[str, bool] = {}
        for r in records:
            if isinstance(r, PreflightEntry):
                preflights[r.mechanism] = preflights.get(r.mechanism, True) and r.passed
        events = _release_events(records)
        eps = {rel: accounting.epsilon(events, delta, "pld", rel) for rel in ("add_remove", "replace_one")}
        eps_rdp = accounting.epsilon(events, delta, "rdp") if neighbouring == "add_remove" else None
        epsilon = eps[neighbouring]

        mechanisms = {}
        for name in sorted(set(plans) | set(state)):
            plan, cur = plans.get(name), state.get(name)
            ev = cur.event if cur is not None else None
            mechanisms[name] = MechanismState(
                name=name, scope=scope_of(name), unit=plan.unit if plan else getattr(cur, "unit", None),
                n_units=plan.n_units if plan else None,
                sigma=plan.sigma if plan else (ev.sigma if ev else None),
                sample_rate=plan.sample_rate if plan else (ev.sample_rate if ev else None),
                max_grad_norm=plan.max_grad_norm if plan else None,
                noise_multiplicity=plan.noise_multiplicity if plan else None,
                planned_steps=plan.planned_steps if plan else None,
                steps_done=cur.steps_done if cur else 0,
                complete=isinstance(cur, CompleteEntry),
                preflight_passed=preflights.get(name),
                target_epsilon=plan.target_epsilon if plan else None,
                epsilon_planned_pld=plan.epsilon_planned_pld if plan else None,
            )
        releases = [r for r in records if isinstance(r, ReleaseEntry)]
        units = sorted({m.unit for m in mechanisms.values() if m.unit and m.scope == "release"}
                       | {r.unit for r in releases if r.unit})
        unit = units[0] if len(units) == 1 else (None if not units else "mixed: " + ", ".join(units))
        sizes = {m.n_units for m in mechanisms.values() if m.n_units and m.scope == "release"}
        if len(sizes) > 1:
            problems.append(f"the mechanisms were planned for different numbers of units {sorted(sizes)}")
        within = None if target is None else bool(epsilon <= target * (1 + 1e-9)) and not problems
        return cls(
            ledger=str(path), delta=float(delta), neighbouring=neighbouring, epsilon=epsilon, epsilon_rdp=eps_rdp,
            epsilon_add_remove=eps["add_remove"], epsilon_replace_one=eps["replace_one"], target_epsilon=target,
            within_target=within, budget_problem="; ".join(problems) or None, unit=unit,
            n_units=sizes.pop() if len(sizes) == 1 else None, mechanisms=mechanisms, releases=releases,
            internal=[r for r in records if isinstance(r, InternalRunEntry)],
            artifacts=[r for r in records if isinstance(r, ArtifactEntry)],
            bounds=[r for r in records if isinstance(r, BoundEntry)], events=events, n_entries=len(records),
        )

    def to_dict(self) -> dict:
        def plain(v):
            if isinstance(v, BaseModel):
                return dump_entry(v)
            if isinstance(v, MechanismState):
                return asdict(v)
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, list):
                return [plain(x) for x in v]
            return v

        out = {f.name: plain(getattr(self, f.name)) for f in fields(self)}
        out["non_private"] = self.non_private
        return out


_MISSING = object()


# ------------------------------------------------------------------ formatting


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.4g}"
    if isinstance(v, dict) and "type" in v:
        return _fmt_event(v)
    if isinstance(v, dict) and "kind" in v:  # a privacy source
        return f"{v['kind']}: {', '.join(v.get('mechanisms') or [])}".rstrip(": ")
    return str(v)


def _fmt_event(ev: dict) -> str:
    if ev.get("type") == "poisson_gaussian":
        return f"poisson_gaussian(sigma={_fmt(ev.get('sigma'))}, q={_fmt(ev.get('sample_rate'))}, T={ev.get('steps')})"
    if ev.get("type") == "gaussian":
        return f"gaussian(sigma={_fmt(ev.get('sigma'))}, count={ev.get('count', 1)})"
    return json.dumps(ev)


_ENTRY_FIELDS = {
    "dp_plan": ("mechanism", "unit", "target_epsilon", "delta", "sigma", "sample_rate", "planned_steps",
                "max_grad_norm", "noise_multiplicity", "epsilon_planned_pld", "epsilon_planned_rdp"),
    "dp_progress": ("mechanism", "steps_done", "epsilon_pld", "epsilon_rdp"),
    "dp_complete": ("mechanism", "steps_done", "epsilon_pld", "epsilon_rdp"),
    "dp_release": ("name", "event"),
    "dp_internal": ("mechanism", "repeats", "event", "epsilon_each", "outputs"),
    "artifact": ("name", "path", "privacy_source"),
}


def _format_entry(e: dict) -> str:
    kind = e.get("kind", "?")
    head = f"#{e.get('seq', '?'):>4} {str(e.get('time', ''))[:19]:19} {kind:12}"
    if kind == "bound":
        b = e["bound"] if isinstance(e.get("bound"), dict) else e
        body = (f"rero bound {_fmt(b.get('bound'))} ({b.get('method')}, kappa={_fmt(b.get('kappa'))}) of "
                f"{', '.join(e.get('mechanisms') or [])}")
    else:
        fields = _ENTRY_FIELDS.get(kind)
        if fields is None:
            fields = [k for k in e if k not in ("kind", "seq", "time")][:6]
        body = ", ".join(f"{k}={_fmt(e[k])}" for k in fields if k in e)
    return f"{head} {body}"


def _format_summary(s: "LedgerSummary") -> str:
    out = [f"privacy ledger: {s.ledger}"]
    if s.non_private:
        out.append("  NOT differentially private (a mechanism ran without noise): epsilon = inf")
    else:
        rdp = f", {_fmt(s.epsilon_rdp)} (RDP cross-check)" if s.epsilon_rdp is not None else ""
        out.append(f"  spent: epsilon = {_fmt(s.epsilon)} (PLD){rdp} at delta = {_fmt(s.delta)}, "
                   f"neighbouring relation {s.neighbouring.replace('_', '/')}")
        other = "replace_one" if s.neighbouring == "add_remove" else "add_remove"
        out.append(f"  the same events for {other.replace('_', '/')} neighbours: epsilon = "
                   f"{_fmt(getattr(s, 'epsilon_' + other))}")
    out.append(f"  unit of privacy: {s.unit or 'unknown'}" + (f", N = {s.n_units} units" if s.n_units else ""))
    if s.target_epsilon is not None:
        ok = "within" if s.within_target else "EXCEEDS"
        out.append(f"  budget: epsilon {_fmt(s.target_epsilon)} ({ok} budget)")
    if s.budget_problem:
        out.append(f"  PROBLEM: {s.budget_problem}")
    for name, m in s.mechanisms.items():
        state = "complete" if m.complete else "in progress"
        out.append(
            f"  mechanism {name} [{m.scope}]: {m.steps_done}/{m.planned_steps if m.planned_steps is not None else '?'} "
            f"steps ({state}), sigma={_fmt(m.sigma)}, q={_fmt(m.sample_rate)}, C={_fmt(m.max_grad_norm)}"
        )
    for r in s.releases:
        out.append(f"  release {r.name}: {_fmt_event(r.event.model_dump())}")
    for r in s.internal:
        out.append(f"  internal {r.mechanism}: {r.repeats} run(s) of {_fmt_event(r.event.model_dump())}, epsilon "
                   f"{_fmt(r.epsilon_each)} each, never released (results in {r.outputs})")
    for a in s.artifacts:
        out.append(f"  artifact {a.name}: {a.path} [{a.privacy_source.describe()}]")
    for b in s.bounds:
        out.append(f"  reconstruction bound of {', '.join(b.mechanisms)}: P[success] <= {_fmt(b.bound.get('bound'))} "
                   f"for prior kappa={_fmt(b.bound.get('kappa'))}")
    return "\n".join(out)


def format_ledger(entries_or_summary: "list[dict] | LedgerSummary") -> str:
    """Human-readable text for a list of entries or a ``summary()``."""
    if isinstance(entries_or_summary, LedgerSummary):
        return _format_summary(entries_or_summary)
    lines = [_format_entry(e) for e in entries_or_summary]
    return "\n".join(lines) if lines else "(empty ledger)"
