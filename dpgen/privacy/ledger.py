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
``dp_plan``
    The privacy plan of one DP mechanism, written once before training:
    ``mechanism`` (e.g. ``"dp_sgd:finetune"``), ``unit`` (``"per image"`` or
    ``"per subject"``: what one privacy unit is), ``target_epsilon``, ``delta``,
    ``sigma`` (noise multiplier), ``sample_rate`` (Poisson q), ``planned_steps``,
    ``max_grad_norm``, ``noise_multiplicity`` (noise draws averaged per unit before
    clipping; does not change the accounting), ``accountant`` (``"pld"``),
    ``epsilon_planned_pld``, ``epsilon_planned_rdp``; optionally ``other_events``
    (events the budget was calibrated to leave room for, e.g. a DP histogram).
``dp_progress``
    Steps done so far by a mechanism: ``mechanism``, ``steps_done``, ``event`` (the
    accounting event for *all* steps done so far, not an increment), ``epsilon_pld``,
    ``epsilon_rdp`` (optional).  Written at checkpoints.
``dp_complete``
    Same fields as ``dp_progress`` plus final values (``sigma``, ``sample_rate``,
    ``target_epsilon``...), written when the mechanism finished.
``dp_release``
    A separately released DP statistic: ``name``, ``event`` (its accounting event),
    ``epsilon`` (optional, its own cost), and the released values if small.
``artifact``
    A file the run produced: ``name``, ``path`` (relative to the run directory),
    ``privacy_source``: ``"dp_sgd:finetune"``, ``"post-processing of dp_sgd:finetune"``,
    ``"public data"``, ``"user-fixed"``, ``"gaussian_histogram"``...
``bound``
    A reconstruction-robustness bound (the dict from ``bounds.rero_bound``), under
    key ``bound`` or inline.
Other kinds (e.g. ``preflight``) are stored verbatim and ignored by the accounting.

What is spent
-------------
``events()``: for each mechanism, the ``event`` of its *latest* ``dp_progress`` or
``dp_complete`` entry (each carries the cumulative steps, so a resumed run that
re-logs progress is never double counted), plus the ``event`` of every
``dp_release`` entry.  All of them are composed in one accountant.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from dpgen.distributed import is_writer
from dpgen.privacy import accounting

__all__ = ["ENTRY_KINDS", "LEDGER_RELPATH", "LedgerError", "PrivacyLedger", "format_ledger", "ledger_path"]

ENTRY_KINDS = ("dp_plan", "dp_progress", "dp_complete", "dp_release", "artifact", "bound")
LEDGER_RELPATH = Path("privacy") / "ledger.jsonl"

# Fields an entry of a known kind must carry; checked on append so that a broken
# entry fails in the training code that wrote it, not in a later report.
_REQUIRED = {
    "dp_plan": ("mechanism",),
    "dp_progress": ("mechanism", "event"),
    "dp_complete": ("mechanism", "event"),
    "dp_release": ("name", "event"),
    "artifact": ("name",),
    "bound": (),
}
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


def _event_list(event: Any) -> list[dict]:
    """An entry's ``event`` may be one event dict or a list of them."""
    if isinstance(event, dict):
        return [event]
    if isinstance(event, list):
        return list(event)
    raise LedgerError(f"'event' must be an accounting event dict or a list of them, got {event!r}")


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
    def _validate(entry: dict) -> None:
        if not isinstance(entry, dict):
            raise LedgerError(f"a ledger entry must be a dict, got {type(entry).__name__}")
        kind = entry.get("kind")
        if not isinstance(kind, str) or not kind:
            raise LedgerError(f"a ledger entry needs a non-empty string 'kind': {entry!r}")
        clash = [k for k in _RESERVED if k in entry]
        if clash:
            raise LedgerError(f"{clash} are set by the ledger itself and must not be in the entry")
        missing = [k for k in _REQUIRED.get(kind, ()) if k not in entry]
        if missing:
            raise LedgerError(f"a {kind!r} entry needs {missing}: {entry!r}")
        if "event" in entry and kind in ("dp_progress", "dp_complete", "dp_release"):
            try:
                for ev in _event_list(entry["event"]):
                    accounting.validate_event(ev)
            except ValueError as err:
                raise LedgerError(f"invalid accounting event in {kind!r} entry: {err}") from err

    def append(self, entry: dict) -> dict:
        """Append one entry durably; return it with its ``seq`` and ``time``.

        The line is written in one ``write`` on an O_APPEND handle, flushed and
        fsynced before this returns, so once ``append`` returns the entry survives
        a crash, and a crash during ``append`` cannot damage earlier lines.
        """
        self._validate(entry)
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

    @staticmethod
    def _current_events(entries: Iterable[dict]) -> tuple[dict[str, dict], list[dict]]:
        by_mechanism: dict[str, dict] = {}
        releases: list[dict] = []
        for entry in entries:
            kind = entry.get("kind")
            if kind in ("dp_progress", "dp_complete"):
                by_mechanism[str(entry["mechanism"])] = entry
            elif kind == "dp_release":
                releases.append(entry)
        return by_mechanism, releases

    def events(self) -> list[dict]:
        """The accounting events of everything spent so far (see module docstring)."""
        by_mechanism, releases = self._current_events(self.entries())
        events: list[dict] = []
        for entry in [*by_mechanism.values(), *releases]:
            events.extend(accounting.validate_event(ev) for ev in _event_list(entry["event"]))
        return events

    def summary(self, delta: float | None = None) -> dict:
        """Privacy spent by the run, recomputed from the ledger's events.

        ``delta`` defaults to the delta of the dp_plan entries (which must agree).
        """
        entries = self.entries()
        plans: dict[str, dict] = {}
        for e in entries:
            if e.get("kind") == "dp_plan":
                plans[str(e.get("mechanism"))] = e
        if delta is None:
            deltas = {p.get("delta") for p in plans.values() if p.get("delta") is not None}
            if len(deltas) != 1:
                raise ValueError(
                    "summary needs delta: "
                    + ("the ledger has no dp_plan with a delta" if not deltas else f"the plans disagree on delta {sorted(deltas)}")
                )
            delta = float(deltas.pop())
        by_mechanism, releases = self._current_events(entries)
        events = []
        for entry in [*by_mechanism.values(), *releases]:
            events.extend(accounting.validate_event(ev) for ev in _event_list(entry["event"]))
        eps_pld = accounting.epsilon(events, delta, "pld")
        eps_rdp = accounting.epsilon(events, delta, "rdp")

        units = sorted({str(p["unit"]) for p in plans.values() if p.get("unit")}
                       | {str(e["unit"]) for e in [*by_mechanism.values(), *releases] if e.get("unit")})
        unit = units[0] if len(units) == 1 else (None if not units else "mixed: " + ", ".join(units))

        mechanisms = {}
        for name in sorted(set(plans) | set(by_mechanism)):
            plan, cur = plans.get(name, {}), by_mechanism.get(name)
            ev = _event_list(cur["event"])[0] if cur else None
            mechanisms[name] = {
                "unit": plan.get("unit", (cur or {}).get("unit")),
                "sigma": plan.get("sigma", ev and ev.get("sigma")),
                "sample_rate": plan.get("sample_rate", ev and ev.get("sample_rate")),
                "max_grad_norm": plan.get("max_grad_norm"),
                "planned_steps": plan.get("planned_steps"),
                "steps_done": (cur or {}).get("steps_done", 0),
                "complete": bool(cur and cur.get("kind") == "dp_complete"),
                "target_epsilon": plan.get("target_epsilon"),
                "epsilon_planned_pld": plan.get("epsilon_planned_pld"),
            }
        targets = {p.get("target_epsilon") for p in plans.values() if p.get("target_epsilon") is not None}
        target = float(targets.pop()) if len(targets) == 1 and len(plans) == 1 else None
        return {
            "ledger": str(self.path),
            "delta": delta,
            "epsilon": eps_pld,
            "epsilon_rdp": eps_rdp,
            "accountant": "pld",
            "non_private": math.isinf(eps_pld),
            "unit": unit,
            "target_epsilon": target,
            "within_target": None if target is None else bool(eps_pld <= target * (1 + 1e-9)),
            "mechanisms": mechanisms,
            "releases": [
                {"name": r.get("name"), "event": r.get("event"), "epsilon": r.get("epsilon")} for r in releases
            ],
            "artifacts": [
                {"name": a.get("name"), "path": a.get("path"), "privacy_source": a.get("privacy_source")}
                for a in entries
                if a.get("kind") == "artifact"
            ],
            "bounds": [{k: v for k, v in b.items() if k != "kind"} for b in entries if b.get("kind") == "bound"],
            "events": events,
            "n_entries": len(entries),
        }


_MISSING = object()


# ------------------------------------------------------------------ formatting


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.4g}"
    if isinstance(v, dict) and "type" in v:
        return _fmt_event(v)
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
    "dp_release": ("name", "event", "epsilon"),
    "artifact": ("name", "path", "privacy_source"),
}


def _format_entry(e: dict) -> str:
    kind = e.get("kind", "?")
    head = f"#{e.get('seq', '?'):>4} {str(e.get('time', ''))[:19]:19} {kind:12}"
    if kind == "bound":
        b = e["bound"] if isinstance(e.get("bound"), dict) else e
        body = (f"rero bound {_fmt(b.get('bound'))} ({b.get('method')}, kappa={_fmt(b.get('kappa'))}, "
                f"sigma={_fmt(b.get('sigma'))}, q={_fmt(b.get('sample_rate'))}, T={b.get('steps')})")
    else:
        fields = _ENTRY_FIELDS.get(kind)
        if fields is None:
            fields = [k for k in e if k not in ("kind", "seq", "time")][:6]
        body = ", ".join(f"{k}={_fmt(e[k])}" for k in fields if k in e)
    return f"{head} {body}"


def _format_summary(s: dict) -> str:
    out = []
    eps = _fmt(s.get("epsilon"))
    out.append(f"privacy ledger: {s.get('ledger')}")
    if s.get("non_private"):
        out.append("  NOT differentially private (a mechanism ran without noise): epsilon = inf")
    else:
        out.append(f"  spent: epsilon = {eps} (PLD), {_fmt(s.get('epsilon_rdp'))} (RDP cross-check) at delta = {_fmt(s.get('delta'))}")
    out.append(f"  unit of privacy: {s.get('unit') or 'unknown'}")
    if s.get("target_epsilon") is not None:
        ok = "within" if s.get("within_target") else "EXCEEDS"
        out.append(f"  target epsilon: {_fmt(s['target_epsilon'])} ({ok} target)")
    for name, m in (s.get("mechanisms") or {}).items():
        state = "complete" if m.get("complete") else "in progress"
        out.append(
            f"  mechanism {name}: {m.get('steps_done')}/{m.get('planned_steps', '?')} steps ({state}), "
            f"sigma={_fmt(m.get('sigma'))}, q={_fmt(m.get('sample_rate'))}, C={_fmt(m.get('max_grad_norm'))}"
        )
    for r in s.get("releases") or []:
        ev = ", ".join(_fmt_event(x) for x in _event_list(r["event"])) if r.get("event") else "?"
        out.append(f"  release {r.get('name')}: {ev}" + (f", epsilon {_fmt(r['epsilon'])} alone" if r.get("epsilon") is not None else ""))
    for a in s.get("artifacts") or []:
        out.append(f"  artifact {a.get('name')}: {a.get('path')} [{a.get('privacy_source') or 'unknown source'}]")
    for b in s.get("bounds") or []:
        b = b["bound"] if isinstance(b.get("bound"), dict) else b
        out.append(
            f"  reconstruction bound ({b.get('method')}): P[success] <= {_fmt(b.get('bound'))} "
            f"for prior kappa={_fmt(b.get('kappa'))}"
        )
    return "\n".join(out)


def format_ledger(entries_or_summary: list[dict] | dict) -> str:
    """Human-readable text for a list of entries or a ``summary()`` dict."""
    if isinstance(entries_or_summary, dict):
        return _format_summary(entries_or_summary)
    lines = [_format_entry(e) for e in entries_or_summary]
    return "\n".join(lines) if lines else "(empty ledger)"
