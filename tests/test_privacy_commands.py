"""Tests for the `dpgen privacy` subcommands (calibrate, report, bound)."""

import argparse
import json
import math

import pytest

from dpgen.privacy import accounting, commands
from dpgen.privacy.ledger import PrivacyLedger, ledger_path

MECH = "dp_sgd:finetune"


def run_cli(argv, capsys):
    parser = argparse.ArgumentParser(prog="dpgen")
    sub = parser.add_subparsers(dest="command")
    commands.register(sub)
    args = parser.parse_args(argv)
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_calibrate_json(capsys):
    rc, out, _ = run_cli(["privacy", "calibrate", "--epsilon", "10", "--delta", "1e-5", "--sample-rate", "0.06",
                          "--steps", "1000", "--json"], capsys)
    assert rc == 0
    r = json.loads(out)
    assert r["sigma"] == pytest.approx(accounting.calibrate_sigma(10.0, 1e-5, 0.06, 1000))
    assert 9.8 <= r["epsilon_pld"] <= 10.0
    assert r["epsilon_rdp"] >= r["epsilon_pld"]
    assert r["accountant"] == "pld" and r["steps"] == 1000


def test_calibrate_text_and_rdp(capsys):
    rc, out, _ = run_cli(["privacy", "calibrate", "--epsilon", "4", "--delta", "1e-6", "--sample-rate", "0.01",
                          "--steps", "2000", "--accountant", "rdp"], capsys)
    assert rc == 0
    assert "sigma (noise multiplier)" in out and "epsilon (PLD)" in out and "epsilon (RDP)" in out
    sigma = float(out.split("=")[1].split()[0])
    eps_rdp = accounting.epsilon([accounting.poisson_gaussian_event(sigma, 0.01, 2000)], 1e-6, "rdp")
    assert eps_rdp <= 4.0 * (1 + 1e-5)  # printed sigma is rounded to 6 digits


def test_calibrate_infinite_epsilon(capsys):
    rc, out, _ = run_cli(["privacy", "calibrate", "--epsilon", "inf", "--delta", "1e-5", "--sample-rate", "0.1",
                          "--steps", "10", "--json"], capsys)
    r = json.loads(out)
    assert rc == 0 and r["sigma"] == 0.0 and math.isinf(r["epsilon_pld"])


def test_calibrate_bad_arguments(capsys):
    rc, out, err = run_cli(["privacy", "calibrate", "--epsilon", "1", "--delta", "2", "--sample-rate", "0.1",
                            "--steps", "10"], capsys)
    assert rc == 2 and out == ""
    assert "delta must be in (0, 1)" in err and len(err.strip().splitlines()) == 1


def test_report_missing_ledger(tmp_path, capsys):
    rc, out, err = run_cli(["privacy", "report", str(tmp_path)], capsys)
    assert rc == 2 and out == ""
    assert "no privacy ledger" in err and str(ledger_path(tmp_path)) in err
    assert len(err.strip().splitlines()) == 1


def _make_run(tmp_path):
    ledger = PrivacyLedger(ledger_path(tmp_path))
    ledger.append({"kind": "dp_plan", "mechanism": MECH, "unit": "per image", "n_units": 1000, "target_epsilon": 10.0,
                   "delta": 1e-5, "sigma": 1.2, "sample_rate": 0.06, "expected_batch_size": 60, "planned_steps": 1000,
                   "max_grad_norm": 1.0, "noise_multiplicity": 1, "accountant": "pld", "epsilon_planned_pld": 9.7,
                   "epsilon_planned_rdp": 10.6})
    ev = accounting.poisson_gaussian_event(1.2, 0.06, 1000)
    ledger.append({"kind": "dp_complete", "mechanism": MECH, "steps_done": 1000, "event": ev, "sigma": 1.2,
                   "sample_rate": 0.06, "max_grad_norm": 1.0, "unit": "per image"})
    ledger.append({"kind": "artifact", "name": "cohort", "path": "cohort/",
                   "privacy_source": {"kind": "post_processing", "mechanisms": [MECH]}})
    return ev


def test_report_json_and_text(tmp_path, capsys):
    ev = _make_run(tmp_path)
    rc, out, _ = run_cli(["privacy", "report", str(tmp_path), "--json"], capsys)
    assert rc == 0
    r = json.loads(out)
    assert r["summary"]["epsilon"] == pytest.approx(accounting.epsilon([ev], 1e-5))
    assert r["summary"]["unit"] == "per image" and r["summary"]["within_target"] is True
    assert [e["kind"] for e in r["entries"]] == ["dp_plan", "dp_complete", "artifact"]

    rc, out, _ = run_cli(["privacy", "report", str(tmp_path)], capsys)
    assert rc == 0
    assert "unit of privacy: per image" in out and "1000/1000 steps (complete)" in out and "dp_complete" in out

    rc, out, _ = run_cli(["privacy", "report", str(tmp_path), "--brief", "--delta", "1e-6"], capsys)
    assert rc == 0 and "dp_complete" not in out and "delta = 1e-06" in out


def test_report_without_delta(tmp_path, capsys):
    PrivacyLedger(ledger_path(tmp_path)).append(
        {"kind": "dp_release", "name": "gaussian:label_histogram", "event": {"type": "gaussian", "sigma": 5.0, "count": 1}})
    rc, _, err = run_cli(["privacy", "report", str(tmp_path)], capsys)
    assert rc == 2 and "--delta" in err
    rc, out, _ = run_cli(["privacy", "report", str(tmp_path), "--delta", "1e-5", "--json"], capsys)
    assert rc == 0 and json.loads(out)["summary"]["epsilon"] > 0


def test_bound_both_json(capsys):
    rc, out, _ = run_cli(["privacy", "bound", "--sigma", "1", "--sample-rate", "0.1", "--steps", "2000",
                          "--kappa", "1e-4", "--json"], capsys)
    assert rc == 0
    r = json.loads(out)
    assert set(r) == {"tight", "gdp"}
    assert r["gdp"]["bound"] == pytest.approx(0.98, abs=0.005)
    assert r["tight"]["bound"] == pytest.approx(0.94, rel=0.05)
    assert r["tight"]["tolerance"] >= 0


@pytest.mark.parametrize("method", ["tight", "gdp"])
def test_bound_single_method(method, capsys):
    rc, out, _ = run_cli(["privacy", "bound", "--sigma", "2", "--sample-rate", "0.1", "--steps", "2000",
                          "--kappa", "1e-4", "--method", method, "--json"], capsys)
    assert rc == 0
    r = json.loads(out)
    assert r["method"] == method and r["bound"] == pytest.approx(0.09, rel=0.05)


def test_bound_text_and_error(capsys):
    rc, out, _ = run_cli(["privacy", "bound", "--sigma", "5", "--sample-rate", "0.1", "--steps", "2000",
                          "--kappa", "1e-4"], capsys)
    assert rc == 0 and "tight" in out and "gdp" in out
    rc, out, err = run_cli(["privacy", "bound", "--sigma", "5", "--sample-rate", "0.1", "--steps", "2000",
                            "--kappa", "2"], capsys)
    assert rc == 2 and "kappa" in err


def test_privacy_requires_a_subcommand(capsys):
    parser = argparse.ArgumentParser(prog="dpgen")
    commands.register(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["privacy"])
