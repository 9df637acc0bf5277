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
HIST = "gaussian:label_histogram"
SOURCE = {"kind": "dp", "mechanisms": [MECH]}


def pg(sigma, q, steps):
    return {"type": "poisson_gaussian", "sigma": sigma, "sample_rate": q, "steps": steps}


def plan(sigma=1.2, q=0.06, steps=1000, target=10.0, mechanism=MECH):
    return {
        "kind": "dp_plan", "mechanism": mechanism, "unit": "per subject", "n_units": 1000, "target_epsilon": target,
        "delta": DELTA, "sigma": sigma, "sample_rate": q, "expected_batch_size": q * 1000, "planned_steps": steps,
        "max_grad_norm": 1.0, "noise_multiplicity": 4, "accountant": "pld", "epsilon_planned_pld": 9.5,
        "epsilon_planned_rdp": 10.3,
    }


def artifact(name="w", path="checkpoints/w", source=SOURCE):
    return {"kind": "artifact", "name": name, "path": path, "privacy_source": source}


@pytest.fixture
def ledger(tmp_path):
    return PrivacyLedger(ledger_path(tmp_path / "run"))


def test_append_adds_seq_and_time_and_creates_parent(ledger, tmp_path):
    assert not ledger.exists() and ledger.entries() == []
    a = ledger.append(plan())
    b = ledger.append(artifact())
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
    ledger.append(artifact("a", "x"))
    ledger.append(artifact("b", "y"))
    ledger.append(artifact("a", "z"))
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
    ledger.append({"kind": "dp_release", "name": HIST, "event": hist})
    ledger.append({"kind": "dp_progress", "mechanism": MECH, "steps_done": 500, "event": pg(1.2, 0.06, 500)})
    ledger.append({"kind": "dp_progress", "mechanism": "dp_sgd:autoencoder", "steps_done": 5, "event": pg(2.0, 0.1, 5)})
    # a resumed run re-logging an older checkpoint's progress would be a later line: latest wins
    assert ledger.events() == [pg(1.2, 0.06, 500), pg(2.0, 0.1, 5), hist]
    ledger.append({**complete(), "steps_done": 1000, "event": pg(1.2, 0.06, 1000)})
    assert ledger.events() == [pg(1.2, 0.06, 1000), pg(2.0, 0.1, 5), hist]
    # an internal mechanism (the evaluation's DP classifiers) is recorded but composed into nothing released
    ledger.append({"kind": "dp_internal", "mechanism": "dp_sgd:evaluation_baseline", "event": pg(1.0, 0.1, 400),
                   "repeats": 3, "epsilon_each": 10.0, "delta": DELTA, "outputs": "internal/evaluation/evaluation.json"})
    assert ledger.events() == [pg(1.2, 0.06, 1000), pg(2.0, 0.1, 5), hist]


def complete(sigma=1.2, q=0.06, steps=1000):
    return {"kind": "dp_complete", "mechanism": MECH, "steps_done": steps, "event": pg(sigma, q, steps),
            "sigma": sigma, "sample_rate": q, "max_grad_norm": 1.0, "unit": "per subject"}


def test_summary_recomputes_epsilon_from_events(ledger):
    hist = {"type": "gaussian", "sigma": 20.0, "count": 1}
    ledger.append(plan())
    ledger.append({"kind": "preflight", "mechanism": MECH, "mode": "hooks", "passed": True, "max_relative_error": 1e-6})
    ledger.append({"kind": "dp_release", "name": HIST, "event": hist})
    ledger.append({"kind": "dp_progress", "mechanism": MECH, "steps_done": 400, "event": pg(1.2, 0.06, 400)})
    ledger.append({"kind": "note", "text": "entries of unknown kinds are kept and ignored"})
    s = ledger.summary()
    assert s.delta == DELTA and s.neighbouring == "add_remove"
    expected = accounting.epsilon([pg(1.2, 0.06, 400), hist], DELTA)
    assert s.epsilon == pytest.approx(expected, rel=1e-12) == s.epsilon_add_remove
    assert s.epsilon <= s.epsilon_rdp
    # the same events for replace-one neighbours (N public): about twice as large
    assert s.epsilon_replace_one == pytest.approx(
        accounting.epsilon([pg(1.2, 0.06, 400), hist], DELTA, neighbouring="replace_one"), rel=1e-12)
    assert s.epsilon_replace_one > 1.5 * s.epsilon
    assert s.unit == "per subject" and not s.non_private and s.n_units == 1000
    assert s.mechanisms[MECH].steps_done == 400 and not s.mechanisms[MECH].complete
    assert s.mechanisms[MECH].preflight_passed is True
    assert s.releases[0].name == HIST and s.release_mechanisms == [MECH, HIST]
    assert s.within_target is True and s.target_epsilon == 10.0

    ledger.append(complete())
    ledger.append(artifact("finetune_weights", "checkpoints/f.safetensors"))
    ledger.append(artifact("cohort", "cohort/", {"kind": "post_processing", "mechanisms": [MECH, HIST]}))
    ledger.append({"kind": "bound", "mechanisms": [MECH, HIST], "bound": {"bound": 0.12, "method": "tight",
                                                                           "kappa": 1e-3, "tolerance": 1e-4}})
    s2 = ledger.summary()
    assert s2.epsilon > s.epsilon
    assert s2.mechanisms[MECH].complete
    assert [a.name for a in s2.artifacts] == ["finetune_weights", "cohort"]
    assert s2.artifacts[1].privacy_source.kind == "post_processing"
    assert s2.bounds[0].bound["bound"] == 0.12
    # explicit delta overrides the plan's
    assert ledger.summary(1e-6).epsilon > s2.epsilon
    json.loads(json.dumps(s2.to_dict()))  # JSON-able


def test_summary_needs_a_delta(ledger):
    ledger.append({"kind": "dp_release", "name": HIST, "event": {"type": "gaussian", "sigma": 5.0, "count": 1}})
    with pytest.raises(ValueError, match="delta"):
        ledger.summary()
    assert ledger.summary(DELTA).epsilon > 0


def test_non_private_run_reports_infinite_epsilon(ledger):
    ledger.append({**plan(sigma=0.0, target=math.inf), "epsilon_planned_pld": math.inf})
    ledger.append(complete(sigma=0.0))
    s = ledger.summary()
    assert math.isinf(s.epsilon) and s.non_private
    assert "NOT differentially private" in format_ledger(s)


def test_a_run_has_one_budget(ledger):
    """Two plans of one run carry the run's budget; the composition is checked against it (an
    over-budget two-plan run must not pass as 'no single target')."""
    ledger.append(plan(sigma=0.5, q=0.5, steps=400))
    ledger.append(plan(sigma=0.5, q=0.5, steps=400, mechanism="dp_sgd:autoencoder"))
    ledger.append(complete(sigma=0.5, q=0.5, steps=400))
    ledger.append({**complete(sigma=0.5, q=0.5, steps=400), "mechanism": "dp_sgd:autoencoder"})
    s = ledger.summary()
    assert s.target_epsilon == 10.0 and s.epsilon > 10.0 and s.within_target is False
    # plans that disagree on the budget are a problem, never silently "no target"
    other = PrivacyLedger(ledger.path.with_name("other.jsonl"))
    other.append(plan(target=10.0))
    other.append(plan(target=66.0, mechanism="dp_sgd:autoencoder"))
    s = other.summary()
    assert s.within_target is False and "one" in s.budget_problem


@pytest.mark.parametrize(
    "entry, msg",
    [
        ({"mechanism": MECH}, "kind"),
        ({"kind": ""}, "kind"),
        ({"kind": "dp_plan"}, "mechanism"),
        ({"kind": "dp_progress", "mechanism": MECH}, "event"),
        ({"kind": "dp_progress", "mechanism": MECH, "event": {"type": "nope"}}, "event"),
        ({"kind": "dp_progress", "mechanism": MECH, "steps_done": 1, "event": pg(1.0, 2.0, 3)}, "sample_rate"),
        ({"kind": "dp_progress", "mechanism": "dp_sgd:made_up", "steps_done": 1, "event": pg(1.0, 0.1, 3)},
         "unknown DP mechanism"),
        ({"kind": "dp_release", "name": "h", "event": {"type": "gaussian", "sigma": 1.0}}, "unknown DP mechanism"),
        ({**artifact(), "seq": 5}, "set by the ledger"),
        ({**artifact(), "obj": object()}, "JSON"),
        # typed privacy sources: prose is not a source, and a source must name what it depends on
        (artifact(source="DP-free fine-tune"), "privacy_source"),
        (artifact(source="dp_sgd:finetune (non-private, sigma 0)"), "privacy_source"),
        (artifact(source={"kind": "dp", "mechanisms": []}), "name the DP mechanisms"),
        (artifact(source={"kind": "public", "mechanisms": [MECH]}), "depends on no DP mechanism"),
        (artifact(source={"kind": "dp", "mechanisms": ["dp_sgd:finetune without noise"]}), "unknown DP mechanism"),
        (artifact(source={"kind": "differentially private", "mechanisms": [MECH]}), "privacy_source"),
        ({"kind": "dp_internal", "mechanism": MECH, "event": pg(1.0, 0.1, 3), "epsilon_each": 1.0, "delta": DELTA,
          "outputs": "internal/x.json"}, "release mechanism"),
        ({"kind": "dp_internal", "mechanism": "dp_sgd:evaluation_baseline", "event": pg(1.0, 0.1, 3),
          "epsilon_each": 1.0, "delta": DELTA, "outputs": "metrics/x.json"}, "internal/"),
    ],
)
def test_invalid_entries_are_rejected_and_not_written(ledger, entry, msg):
    with pytest.raises((LedgerError, TypeError), match=msg):
        ledger.append(entry)
    assert not ledger.path.exists()


def test_numpy_values_are_serialised(ledger):
    e = ledger.append({"kind": "dp_release", "name": HIST, "event": {"type": "gaussian", "sigma": np.float64(20.0), "count": 1},
                       "values": np.array([1.5, 2.5])})
    assert ledger.entries()[0]["values"] == [1.5, 2.5] and e["seq"] == 1


def test_seq_continues_across_instances(ledger):
    ledger.append(plan())
    other = PrivacyLedger(ledger.path)
    assert other.append(artifact())["seq"] == 2


def test_format_ledger(ledger):
    ledger.append(plan())
    ledger.append({"kind": "dp_progress", "mechanism": MECH, "steps_done": 10, "event": pg(1.2, 0.06, 10),
                   "epsilon_pld": 0.9})
    ledger.append(artifact())
    ledger.append({"kind": "bound", "mechanisms": [MECH], "bound": {"bound": 0.1, "method": "tight", "kappa": 1e-3}})
    text = format_ledger(ledger.entries())
    assert "dp_plan" in text and "dp_progress" in text and "steps_done=10" in text and "rero bound 0.1" in text
    summary_text = format_ledger(ledger.summary())
    assert "per subject" in summary_text and "epsilon" in summary_text and "checkpoints/w" in summary_text
    assert "10/1000 steps" in summary_text
    assert format_ledger([]) == "(empty ledger)"


def test_a_hand_edited_line_of_a_known_kind_fails_the_typed_reading(ledger):
    """A release must never be decided on an entry it cannot read: a prose privacy source
    written into the file by hand makes records() (and so the release) fail, naming the line."""
    ledger.append(plan())
    with open(ledger.path, "a") as fh:
        fh.write(json.dumps({"kind": "artifact", "name": "cohort", "path": "cohort/cohort.npz",
                             "privacy_source": "post-processing of dp_sgd:finetune", "seq": 2}) + "\n")
    assert len(ledger.entries()) == 2
    with pytest.raises(LedgerError, match="entry #2"):
        ledger.records()
