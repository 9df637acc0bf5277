"""Tests for dpgen.privacy.ledger: the append-only record of what a run spent."""

import json
import math
from datetime import datetime

import numpy as np
import pytest

from dpgen.privacy import accounting
from dpgen.privacy.ledger import LedgerError, PrivacyLedger, format_ledger, ledger_path

DELTA = 1e-5
MECH = "dp_sgd:finetune"


def pg(sigma, q, steps):
    return {"type": "poisson_gaussian", "sigma": sigma, "sample_rate": q, "steps": steps}


def plan(sigma=1.2, q=0.06, steps=1000, target=10.0):
    return {
        "kind": "dp_plan", "mechanism": MECH, "unit": "per subject", "target_epsilon": target, "delta": DELTA,
        "sigma": sigma, "sample_rate": q, "planned_steps": steps, "max_grad_norm": 1.0, "noise_multiplicity": 4,
        "accountant": "pld", "epsilon_planned_pld": 9.5, "epsilon_planned_rdp": 10.3,
    }


@pytest.fixture
def ledger(tmp_path):
    return PrivacyLedger(ledger_path(tmp_path / "run"))


def test_append_adds_seq_and_time_and_creates_parent(ledger, tmp_path):
    assert not ledger.exists() and ledger.entries() == []
    a = ledger.append(plan())
    b = ledger.append({"kind": "artifact", "name": "w", "path": "checkpoints/w", "privacy_source": MECH})
    assert ledger.path == tmp_path / "run" / "privacy" / "ledger.jsonl" and ledger.exists()
    assert (a["seq"], b["seq"]) == (1, 2)
    for e in (a, b):
        t = datetime.fromisoformat(e["time"].replace("Z", "+00:00"))
        assert t.utcoffset().total_seconds() == 0
    assert ledger.entries() == [a, b]
    # one JSON object per line
    lines = ledger.path.read_text().splitlines()
    assert [json.loads(x) for x in lines] == [a, b]


def test_append_does_not_mutate_the_callers_dict(ledger):
    entry = plan()
    ledger.append(entry)
    assert "seq" not in entry and "time" not in entry


def test_earlier_lines_are_byte_identical_after_appends(ledger):
    ledger.append(plan())
    ledger.append({"kind": "dp_progress", "mechanism": MECH, "steps_done": 10, "event": pg(1.2, 0.06, 10)})
    before = ledger.path.read_bytes()
    for i in range(5):
        ledger.append({"kind": "dp_progress", "mechanism": MECH, "steps_done": 20 + i, "event": pg(1.2, 0.06, 20 + i)})
    after = ledger.path.read_bytes()
    assert after.startswith(before)
    assert [e["seq"] for e in ledger.entries()] == list(range(1, 8))


def test_truncated_last_line_is_tolerated_and_sealed(ledger):
    ledger.append(plan())
    ledger.append({"kind": "dp_progress", "mechanism": MECH, "steps_done": 10, "event": pg(1.2, 0.06, 10)})
    good = ledger.path.read_bytes()
    with open(ledger.path, "ab") as fh:  # simulate a crash half-way through an append
        fh.write(b'{"kind": "dp_progress", "mechanism": "dp_sg')
    crashed = ledger.path.read_bytes()
    with pytest.warns(RuntimeWarning, match="truncated last line"):
        entries = ledger.entries()
    assert [e["seq"] for e in entries] == [1, 2]
    with pytest.warns(RuntimeWarning, match="truncated"):
        new = ledger.append({"kind": "dp_progress", "mechanism": MECH, "steps_done": 20, "event": pg(1.2, 0.06, 20)})
    assert new["seq"] == 3
    data = ledger.path.read_bytes()
    assert data.startswith(crashed) and crashed.startswith(good)
    with pytest.warns(RuntimeWarning, match="unreadable line"):
        entries = ledger.entries()
    assert [e["seq"] for e in entries] == [1, 2, 3]
    with pytest.warns(RuntimeWarning):
        assert ledger.events() == [pg(1.2, 0.06, 20)]


def test_latest_with_match(ledger):
    ledger.append({"kind": "artifact", "name": "a", "path": "x"})
    ledger.append({"kind": "artifact", "name": "b", "path": "y"})
    ledger.append({"kind": "artifact", "name": "a", "path": "z"})
    assert ledger.latest("artifact")["path"] == "z"
    assert ledger.latest("artifact", name="b")["path"] == "y"
    assert ledger.latest("artifact", name="c") is None
    assert ledger.latest("dp_plan") is None
    assert ledger.latest("artifact", missing_field=None) is None


def test_events_latest_progress_per_mechanism_plus_releases(ledger):
    hist = {"type": "gaussian", "sigma": 20.0, "count": 1}
    ledger.append(plan())
    assert ledger.events() == []
    ledger.append({"kind": "dp_progress", "mechanism": MECH, "steps_done": 100, "event": pg(1.2, 0.06, 100)})
    ledger.append({"kind": "dp_release", "name": "label_histogram", "event": hist})
    ledger.append({"kind": "dp_progress", "mechanism": MECH, "steps_done": 500, "event": pg(1.2, 0.06, 500)})
    ledger.append({"kind": "dp_progress", "mechanism": "dp_sgd:other", "steps_done": 5, "event": pg(2.0, 0.1, 5)})
    # a resumed run re-logging an older checkpoint's progress would be a later line: latest wins
    assert ledger.events() == [pg(1.2, 0.06, 500), pg(2.0, 0.1, 5), hist]
    ledger.append({"kind": "dp_complete", "mechanism": MECH, "steps_done": 1000, "event": pg(1.2, 0.06, 1000)})
    assert ledger.events() == [pg(1.2, 0.06, 1000), pg(2.0, 0.1, 5), hist]


def test_summary_recomputes_epsilon_from_events(ledger):
    hist = {"type": "gaussian", "sigma": 20.0, "count": 1}
    ledger.append(plan())
    ledger.append({"kind": "preflight", "mechanism": MECH, "max_relative_error": 1e-6})  # unknown kinds are kept
    ledger.append({"kind": "dp_release", "name": "label_histogram", "event": hist, "epsilon": 0.2})
    ledger.append({"kind": "dp_progress", "mechanism": MECH, "steps_done": 400, "event": pg(1.2, 0.06, 400)})
    s = ledger.summary()
    assert s["delta"] == DELTA
    expected = accounting.epsilon([pg(1.2, 0.06, 400), hist], DELTA)
    assert s["epsilon"] == pytest.approx(expected, rel=1e-12)
    assert s["epsilon"] <= s["epsilon_rdp"]
    assert s["unit"] == "per subject" and not s["non_private"]
    assert s["mechanisms"][MECH]["steps_done"] == 400 and not s["mechanisms"][MECH]["complete"]
    assert s["releases"][0]["name"] == "label_histogram"
    assert s["within_target"] is True and s["target_epsilon"] == 10.0

    ledger.append({"kind": "dp_complete", "mechanism": MECH, "steps_done": 1000, "event": pg(1.2, 0.06, 1000)})
    ledger.append({"kind": "artifact", "name": "finetune_weights", "path": "checkpoints/f.safetensors",
                   "privacy_source": MECH})
    ledger.append({"kind": "artifact", "name": "cohort", "path": "cohort/", "privacy_source": f"post-processing of {MECH}"})
    ledger.append({"kind": "bound", "bound": {"bound": 0.12, "method": "tight", "kappa": 1e-3, "sigma": 1.2,
                                             "sample_rate": 0.06, "steps": 1000, "tolerance": 1e-4}})
    s2 = ledger.summary()
    assert s2["epsilon"] > s["epsilon"]
    assert s2["mechanisms"][MECH]["complete"]
    assert [a["name"] for a in s2["artifacts"]] == ["finetune_weights", "cohort"]
    assert s2["artifacts"][1]["privacy_source"] == f"post-processing of {MECH}"
    assert s2["bounds"][0]["bound"]["bound"] == 0.12
    # explicit delta overrides the plan's
    assert ledger.summary(1e-6)["epsilon"] > s2["epsilon"]
    json.loads(json.dumps(s2))  # JSON-able


def test_summary_needs_a_delta(ledger):
    ledger.append({"kind": "dp_release", "name": "h", "event": {"type": "gaussian", "sigma": 5.0, "count": 1}})
    with pytest.raises(ValueError, match="delta"):
        ledger.summary()
    assert ledger.summary(DELTA)["epsilon"] > 0


def test_non_private_run_reports_infinite_epsilon(ledger):
    ledger.append({**plan(sigma=0.0, target=math.inf), "epsilon_planned_pld": math.inf})
    ledger.append({"kind": "dp_complete", "mechanism": MECH, "steps_done": 1000, "event": pg(0.0, 0.06, 1000)})
    s = ledger.summary()
    assert math.isinf(s["epsilon"]) and s["non_private"]
    assert "NOT differentially private" in format_ledger(s)


@pytest.mark.parametrize(
    "entry, msg",
    [
        ({"mechanism": MECH}, "kind"),
        ({"kind": ""}, "kind"),
        ({"kind": "dp_plan"}, "mechanism"),
        ({"kind": "dp_progress", "mechanism": MECH}, "event"),
        ({"kind": "dp_progress", "mechanism": MECH, "event": {"type": "nope"}}, "invalid accounting event"),
        ({"kind": "dp_release", "name": "h", "event": pg(1.0, 2.0, 3)}, "sample_rate"),
        ({"kind": "artifact", "name": "x", "seq": 5}, "set by the ledger"),
        ({"kind": "artifact", "name": "x", "obj": object()}, "JSON"),
    ],
)
def test_invalid_entries_are_rejected_and_not_written(ledger, entry, msg):
    with pytest.raises((LedgerError, TypeError), match=msg):
        ledger.append(entry)
    assert not ledger.path.exists()


def test_numpy_values_are_serialised(ledger):
    e = ledger.append({"kind": "dp_release", "name": "h", "event": {"type": "gaussian", "sigma": np.float64(20.0), "count": 1},
                       "values": np.array([1.5, 2.5])})
    assert ledger.entries()[0]["values"] == [1.5, 2.5] and e["seq"] == 1


def test_seq_continues_across_instances(ledger):
    ledger.append(plan())
    other = PrivacyLedger(ledger.path)
    assert other.append({"kind": "artifact", "name": "x"})["seq"] == 2


def test_format_ledger(ledger):
    ledger.append(plan())
    ledger.append({"kind": "dp_progress", "mechanism": MECH, "steps_done": 10, "event": pg(1.2, 0.06, 10),
                   "epsilon_pld": 0.9})
    ledger.append({"kind": "artifact", "name": "w", "path": "checkpoints/w", "privacy_source": MECH})
    ledger.append({"kind": "bound", "bound": 0.1, "method": "gdp", "kappa": 1e-3, "sigma": 1.2, "sample_rate": 0.06,
                   "steps": 10})
    text = format_ledger(ledger.entries())
    assert "dp_plan" in text and "dp_progress" in text and "steps_done=10" in text and "rero bound 0.1" in text
    summary_text = format_ledger(ledger.summary())
    assert "per subject" in summary_text and "epsilon" in summary_text and "checkpoints/w" in summary_text
    assert "10/1000 steps" in summary_text
    assert format_ledger([]) == "(empty ledger)"
