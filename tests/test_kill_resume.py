"""A run killed with SIGKILL mid-fine-tune and resumed ends with the same steps and epsilon
as an uninterrupted run (a real subprocess, a real kill)."""

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from dpgen.privacy.ledger import PrivacyLedger


def _config(tmp_path, tiny_raw):
    tiny_raw["finetune"].update({"steps": 30, "checkpoint_every": 4})
    tiny_raw["sample"]["num_images"] = 4
    p = tmp_path / "kill.yaml"
    p.write_text(yaml.safe_dump(tiny_raw))
    return p


def _dpgen(*args):
    return [sys.executable, "-m", "dpgen.cli", *args, "--no-progress"]


def _progress(ledger_path):
    if not ledger_path.is_file():
        return 0
    steps = [json.loads(line).get("steps_done", 0) for line in ledger_path.read_text().splitlines()
             if line.strip().endswith("}") and '"dp_progress"' in line]
    return max(steps, default=0)


def test_sigkill_mid_finetune_then_resume_matches_uninterrupted(tmp_path, tiny_raw):
    cfg = _config(tmp_path, tiny_raw)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"

    proc = subprocess.Popen(_dpgen("run", str(cfg), "--run-dir", str(killed_dir)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ledger_path = killed_dir / "privacy" / "ledger.jsonl"
    deadline = time.time() + 1500  # generous: a loaded 2-core machine is slow
    while _progress(ledger_path) < 8 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _progress(ledger_path)
    assert 8 <= killed_at < 30
    assert not (killed_dir / "checkpoints" / "finetune.safetensors").exists()

    # without --resume the directory is protected
    again = subprocess.run(_dpgen("run", str(cfg), "--run-dir", str(killed_dir)), env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr

    resumed = subprocess.run(_dpgen("run", str(cfg), "--run-dir", str(killed_dir), "--resume"), env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    clean = subprocess.run(_dpgen("run", str(cfg), "--run-dir", str(clean_dir)), env=env, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr[-3000:]

    a = PrivacyLedger(ledger_path)
    b = PrivacyLedger(clean_dir / "privacy" / "ledger.jsonl")
    done_a, done_b = a.latest("dp_complete"), b.latest("dp_complete")
    assert done_a["steps_done"] == done_b["steps_done"] == 30
    assert done_a["epsilon_pld"] == done_b["epsilon_pld"]
    assert a.summary(1e-5).epsilon == b.summary(1e-5).epsilon <= 8.0
    # one plan, never re-planned; progress only moves forward
    assert len([e for e in a.entries() if e["kind"] == "dp_plan"]) == 1
    progress = [e["steps_done"] for e in a.entries() if e["kind"] == "dp_progress"]
    assert progress == sorted(progress) and progress[-1] == 30
