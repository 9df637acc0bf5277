"""Federated DP fine-tuning on Flower with real processes on 127.0.0.1.

One federation (module fixture) runs a coordinator and two sites as separate process groups,
SecAgg+ on, two rounds of a tiny config, and exercises the failure paths on the way:
- site b is killed (SIGKILL, its whole process group) while it trains in round 1, and
  restarted: the round fails (SecAgg+ cannot unmask with one of two sites), is retried and
  completes; site a replays its round-1 update, site b continues its round-1 allocation;
- the coordinator is killed (SIGKILL) after round 1 is committed and restarted with
  --resume: it continues with round 2 from its round-1 checkpoint.
The tests then read what the processes left in their run directories. Quicker tests cover
a budget too small for one round, another image size and an unreachable coordinator.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO, TINY

pytestmark = pytest.mark.federated

flwr = pytest.importorskip("flwr", reason="Flower is an optional extra: pip install -e '.[federated]'")

from dpgen.federated import arrays  # noqa: E402
from dpgen.federated.demo import start_process, stop_group  # noqa: E402
from dpgen.privacy.ledger import PrivacyLedger  # noqa: E402

TIMEOUT = 1200  # generous: the shared 2-core machine may be loaded


def _fed_config(port: int, **site_overrides) -> dict:
    t = copy.deepcopy(TINY)
    site = {"data": {"source": "breastmnist"}, "privacy": {"epsilon": 8.0, "delta": 1e-5},
            "finetune": {"rounds": 2, "local_steps": 4, "batch_size": 16, "physical_batch_size": 16,
                         "checkpoint_every": 2},
            "connect_timeout_s": 300}
    a = copy.deepcopy(site)
    a["rows"] = [0, 60]
    b = copy.deepcopy(site)
    b.update(rows=[60, 96], privacy={"epsilon": 4.0, "delta": 1e-5})
    b["finetune"].update(batch_size=12, physical_batch_size=12)
    cfg = {
        "name": "tinyfed", "seed": 0,
        "data": {"public": t["data"]["public"], "num_classes": 2, "class_names": t["data"]["class_names"]},
        "model": t["model"], "pretrain": t["pretrain"],
        "sample": {**t["sample"], "class_counts": {"mode": "uniform"}},
        "coordinator": {"address": f"127.0.0.1:{port}", "rounds": 2, "min_sites": 2, "wait_for_sites_s": 600,
                        "round_retries": 2},
        "sites": {"a": a, "b": b},
    }
    for k, v in site_overrides.items():
        cfg["sites"][k] = v
    return cfg


def _env() -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), DPGEN_THREADS="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", DPGEN_FED_AUDIT_RECEIVED="1", DPGEN_FED_DEBUG="1", PYTHONUNBUFFERED="1")
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dpgen.cli", "federated", *args]


def _state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _wait(cond, what: str, procs: dict, timeout: float = TIMEOUT, logs: Path | None = None) -> None:
    end = time.time() + timeout
    while not cond():
        dead = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
        if dead or time.time() > end:
            tails = ""
            if logs is not None:
                tails = "\n".join(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-25:])
                                  for f in sorted(logs.glob("*.log")))
            raise AssertionError(f"waiting for {what}: {'exited ' + str(dead) if dead else 'timeout'}\n{tails}")
        time.sleep(0.2)


def _free_port() -> int:
    from dpgen.federated.flower import free_port

    return free_port()


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("federation")
    cfg_path = root / "federation.yaml"
    cfg_path.write_text(yaml.safe_dump(_fed_config(_free_port())))
    coord_dir, logs = root / "coordinator", root / "logs"
    site_dir = {n: root / "sites" / n for n in ("a", "b")}
    env = _env()

    def coordinator(resume: bool):
        return start_process(_cli("coordinator", str(cfg_path), "--run-dir", str(coord_dir), "--no-progress",
                                  *(["--resume"] if resume else [])), logs / "coordinator.log", env)

    def site(name: str):
        return start_process(_cli("site", str(cfg_path), "--site", name, "--run-dir", str(site_dir[name])),
                             logs / f"site_{name}.log", env)

    t0 = time.time()
    procs = {"coordinator": coordinator(False), "a": site("a"), "b": site("b")}
    events: dict = {}
    try:
        # 1. kill site b while it trains in round 1, then bring it back
        _wait(lambda: _state(site_dir["b"] / "state.json").get("federated_site", {}).get("status") == "training",
              "site b training in round 1", procs, logs=logs)
        time.sleep(1.0)
        stop_group(procs["b"], signal.SIGKILL)
        events["site_b_killed"] = time.time() - t0
        procs["b"] = site("b")

        # 2. kill the coordinator once round 1 is committed, resume it
        ledger = coord_dir / "privacy" / "ledger.jsonl"
        _wait(lambda: ledger.is_file() and '"fed_round"' in ledger.read_text(), "round 1 committed", procs, logs=logs)
        stop_group(procs["coordinator"], signal.SIGKILL)
        events["coordinator_killed"] = time.time() - t0
        procs["coordinator"] = coordinator(True)

        _wait(lambda: procs["coordinator"].poll() is not None, "the coordinator to finish", {}, logs=logs)
        for n in ("a", "b"):
            _wait(lambda n=n: procs[n].poll() is not None, f"site {n} to stop", {}, timeout=120, logs=logs)
    finally:
        for p in procs.values():
            stop_group(p)
    events["seconds"] = time.time() - t0
    out = {n: (logs / f"{'coordinator' if n == 'coordinator' else 'site_' + n}.log").read_text(errors="replace")
           for n in procs}
    return {"root": root, "coord": coord_dir, "sites": site_dir, "rc": {n: p.returncode for n, p in procs.items()},
            "logs": out, "events": events}


def _entries(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in PrivacyLedger.for_run(run_dir).entries() if e.get("kind") == kind]


def test_two_rounds_two_sites_secagg(federation, capsys):
    from dpgen.cli import main

    f = federation
    assert f["rc"]["coordinator"] == 0, f["logs"]["coordinator"][-3000:]
    assert f["rc"]["a"] == 0 and f["rc"]["b"] == 0, (f["logs"]["a"][-2000:], f["logs"]["b"][-2000:])
    rounds = _entries(f["coord"], "fed_round")
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert sorted(r["sites"]) == ["a", "b"] and r["weights"] == {"a": 16, "b": 12}
        assert r["secure_aggregation"]["enabled"] and r["secure_aggregation"]["protocol"].startswith("SecAgg+")
    # the global model changed in every round
    w0 = arrays.load(f["coord"] / "checkpoints" / "pretrain.safetensors")
    w1 = arrays.load(f["coord"] / rounds[0]["checkpoint"])
    w2 = arrays.load(f["coord"] / "checkpoints" / "finetune.safetensors")
    assert rounds[0]["global_before"] != rounds[0]["global_after"] == rounds[1]["global_before"]
    assert any(not np.array_equal(w0[k], w1[k]) for k in w0) and any(not np.array_equal(w1[k], w2[k]) for k in w1)
    assert (f["coord"] / "cohort" / "cohort.npz").is_file()

    assert main(["federated", "report", str(f["coord"]), "--json"]) == 0
    guarantees = {g["site"]: g for g in json.loads(capsys.readouterr().out)["sites"]}
    for name, target in (("a", 8.0), ("b", 4.0)):
        ledger = PrivacyLedger.for_run(f["sites"][name])
        plan = ledger.latest("dp_plan")
        done = ledger.latest("dp_complete")
        assert plan["planned_steps"] == 8 and plan["target_epsilon"] == target
        assert done is not None and done["steps_done"] == 8 and done["epsilon_pld"] <= target
        assert ledger.summary()["epsilon"] == pytest.approx(done["epsilon_pld"]) and ledger.summary()["within_target"]
        # the coordinator's record matches the site's ledger
        g = guarantees[name]
        assert g["epsilon"] == pytest.approx(done["epsilon_pld"]) and g["steps_done"] == 8
        assert g["delta"] == plan["delta"] and g["unit"] == plan["unit"] == "per image" and g["within_target"]
        assert g["complete"] and g["confirmed_at_finish"] and g["rounds_contributed"] == [1, 2]
        progress = [e for e in _entries(f["coord"], "fed_site_progress") if e["site"] == name]
        by_round = {e["round"]: e["progress"]["epsilon_pld"] for e in progress}
        site_rounds = {e["round"]: e["epsilon_pld"] for e in ledger.entries() if e["kind"] == "fed_round_done"}
        assert by_round == pytest.approx(site_rounds)
        # the site never told the coordinator its data size
        reported = json.dumps([e for e in PrivacyLedger.for_run(f["coord"]).entries() if e.get("site") == name])
        assert "n_units" not in reported and "sample_rate" not in reported and '"sigma"' not in reported


def test_coordinator_never_holds_an_individual_update(federation):
    f = federation
    received = sorted((f["coord"] / "internal" / "received").glob("*.json"))
    assert received, "the coordinator recorded nothing it received"
    updates = {(n, r): arrays.load(f["sites"][n] / "internal" / "rounds" / f"round_{r:04d}.safetensors")
               for n in ("a", "b") for r in (1, 2)}
    masked = compared = 0
    for meta_path in received:
        meta = json.loads(meta_path.read_text())
        if meta["message_type"] != "train" or meta["error"]:
            continue
        data = np.load(meta_path.with_suffix(".npz"))
        for key in data.files:
            assert not key.startswith("array/") or data[key].size == 0, f"{meta_path.name}: {key} arrived in the clear"
            if key.startswith("bytes/") and "masked_params" in key:
                masked += 1
                vec = data[key].astype(np.float64).ravel()
                for (name, r), upd in updates.items():
                    u = arrays.flatten(upd, list(upd)).astype(np.float64)
                    if u.size == vec.size:  # the masked vector is uncorrelated with every update
                        compared += 1
                        assert abs(np.corrcoef(vec, u)[0, 1]) < 0.05, (meta_path.name, name, r)
    assert masked > 0 and compared > 0, "no masked vectors seen: was SecAgg+ on?"
    # what the coordinator unmasked is the weighted sum of the sites' updates, nothing else
    rounds = {e["round"]: e for e in _entries(f["coord"], "fed_round")}
    before = arrays.load(f["coord"] / "checkpoints" / "pretrain.safetensors")
    for r in (1, 2):
        after = arrays.load(f["coord"] / rounds[r]["checkpoint"])
        for k, ua in updates[("a", r)].items():
            expected = (16 * ua + 12 * updates[("b", r)][k]) / 28
            np.testing.assert_allclose(after[k] - before[k], expected, atol=2e-5)
        before = after


def test_site_killed_mid_round_then_round_retried_and_resumed(federation):
    f = federation
    assert f["rc"]["coordinator"] == 0
    failed = _entries(f["coord"], "fed_round_failed")
    assert failed and failed[0]["round"] == 1 and failed[0]["contributed"] in ([], ["a"])
    assert "b" not in failed[0]["contributed"]
    r1 = [e for e in _entries(f["coord"], "fed_round") if e["round"] == 1][0]
    assert r1["attempt"] >= 2 and sorted(r1["sites"]) == ["a", "b"]
    # site a computed round 1 once and sent the same update again; b continued its allocation
    a_done = [e for e in PrivacyLedger.for_run(f["sites"]["a"]).entries() if e["kind"] == "fed_round_done"]
    assert [e["round"] for e in a_done] == [1, 2]
    replays = [e for e in _entries(f["coord"], "fed_site_progress") if e["site"] == "a" and e["round"] == 1]
    assert replays and replays[-1]["replayed"]
    b = PrivacyLedger.for_run(f["sites"]["b"]).entries()
    starts = [(e["round"], e["first_step"], e["last_step"]) for e in b if e["kind"] == "fed_round_start"]
    assert starts == [(1, 0, 4), (2, 4, 8)]  # no step index was spent twice
    progress = [e["steps_done"] for e in b if e["kind"] == "dp_progress"]
    assert progress == sorted(progress) and progress[-1] == 8


def test_coordinator_killed_and_resumed(federation):
    f = federation
    assert "coordinator_killed" in f["events"] and f["rc"]["coordinator"] == 0
    assert "resuming after round 1" in f["logs"]["coordinator"]
    rounds = _entries(f["coord"], "fed_round")
    assert [r["round"] for r in rounds] == [1, 2]  # round 1 not redone after the restart


# ----------------------------------------------------------------------------- quick failure paths


def test_budget_too_small_for_one_round_is_refused_before_connecting(tmp_path):
    cfg = _fed_config(_free_port())
    cfg["sites"]["a"]["privacy"]["epsilon"] = 0.05  # one round of 4 steps costs 0.083 at sigma 20
    p = tmp_path / "f.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = subprocess.run(_cli("site", str(p), "--site", "a", "--run-dir", str(tmp_path / "a")), env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "too small for one round" in out.stderr
    assert _state(tmp_path / "a" / "state.json")["federated_site"]["status"] == "refused"


def test_max_noise_multiplier_says_how_many_rounds_the_budget_pays_for(tmp_path):
    from dpgen.federated import local_training as lt
    from dpgen.federated.config import load_site_config
    from dpgen.federated.site import open_site_dir

    cfg = _fed_config(_free_port())
    cfg["sites"]["a"]["finetune"].update(rounds=6, max_noise_multiplier=1.5)  # pays for 2 rounds
    cfg["sites"]["a"]["privacy"]["epsilon"] = 3.0
    p = tmp_path / "f.yaml"
    p.write_text(yaml.safe_dump(cfg))
    site = open_site_dir(tmp_path / "a", load_site_config(p, "a"), "a")
    with pytest.raises(lt.SiteRefusal, match=r"pays for 2 round\(s\): set finetune.rounds <= 2"):
        lt.plan_site(site)


def test_site_with_another_image_size_is_refused(tmp_path):
    from dpgen.federated import local_training as lt
    from dpgen.federated.config import load_site_config
    from dpgen.federated.site import open_site_dir

    rng = np.random.default_rng(0)
    npz = tmp_path / "big.npz"
    imgs = rng.integers(0, 255, (40, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 2, (40, 1))
    np.savez(npz, train_images=imgs, train_labels=labels, val_images=imgs[:4], val_labels=labels[:4],
             test_images=imgs[:4], test_labels=labels[:4])
    cfg = _fed_config(_free_port())
    cfg["sites"]["a"].update(data={"source": str(npz)}, rows=None)
    p = tmp_path / "f.yaml"
    p.write_text(yaml.safe_dump(cfg))
    site = open_site_dir(tmp_path / "a", load_site_config(p, "a"), "a")
    lt.plan_site(site)
    schema = {"family": "diffusion", "spec": {"image_shape": [1, 28, 28]}, "num_classes": 2}
    st = lt.site_status(site, schema, 1)
    assert not st["accept"] and st["fatal"] and "(1, 32, 32)" in st["reason"] and "(1, 28, 28)" in st["reason"]


def test_unreachable_coordinator_is_a_clear_error(tmp_path, monkeypatch):
    from dpgen.federated.site import SiteError, run_site

    cfg = _fed_config(_free_port())  # nothing listens there
    cfg["sites"]["a"]["connect_timeout_s"] = 3
    p = tmp_path / "f.yaml"
    p.write_text(yaml.safe_dump(cfg))
    for k, v in _env().items():
        monkeypatch.setenv(k, v)
    import torch

    threads = torch.get_num_threads()
    try:
        with pytest.raises(SiteError, match="could not be reached") as err:
            run_site(p, "a", tmp_path / "a", log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)  # the site launcher limits its process to one thread
    assert cfg["coordinator"]["address"] in str(err.value)


def test_config_errors_name_the_key(tmp_path):
    from dpgen.config import ConfigError
    from dpgen.federated.config import federation_from_dict, load_site_config

    cfg = _fed_config(9092)
    cfg["coordinator"]["min_sites"] = 1
    with pytest.raises(ConfigError, match="min_sites must be >= 2"):
        federation_from_dict(cfg)
    cfg = _fed_config(9092)
    cfg["sites"]["a"]["finetune"]["local_step"] = 3
    p = tmp_path / "f.yaml"
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"sites\.a\.finetune\.local_step"):
        load_site_config(p, "a")
    with pytest.raises(ConfigError, match="no such site"):
        load_site_config(p, "zzz")
    assert federation_from_dict(yaml.safe_load((REPO / "configs" / "federated_breast.yaml").read_text())).sites
