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
    site = {"data": {"source": "breastmnist"}, "privacy": {"epsilon": 8.0, "delta": 1e-5, "public_unit_count": 60},
            "finetune": {"rounds": 2, "local_steps": 4, "batch_size": 16, "physical_batch_size": 16,
                         "checkpoint_every": 2},
            "connect_timeout_s": 300}
    a = copy.deepcopy(site)
    a["rows"] = [0, 60]
    b = copy.deepcopy(site)
    b.update(rows=[60, 96], privacy={"epsilon": 4.0, "delta": 1e-5, "public_unit_count": 36})
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


def _site_figures(site_dir: Path) -> list[str]:
    """What would reveal a site's N: N itself, its sample rate, noise multiplier and exact
    epsilons (as text, in the formats dpgen and json write floats)."""
    led = PrivacyLedger.for_run(site_dir)
    plan = led.latest("dp_plan")
    floats = {plan["sample_rate"], plan["sigma"], plan["epsilon_planned_pld"]}
    floats |= {e["epsilon_pld"] for e in led.entries() if isinstance(e.get("epsilon_pld"), float) and e["epsilon_pld"]}
    out = [f"N = {plan['n_units']}", f"n_units\": {plan['n_units']}", f"{plan['n_units']} private"]
    for x in floats:
        out += [repr(x), f"{x:.5g}", f"{x:.5f}"]
    return out


def _assert_no_site_figures(coord_dir: Path, site_dirs, also=()) -> None:
    """Nothing the coordinator holds (its run directory, minus the demo's sites/ folder and the
    site processes' logs, which belong to the sites) states a site's N or what it follows from."""
    figures = {fig: site for site in site_dirs for fig in _site_figures(site)}
    import re

    keys = re.compile(r'"(n_units|sample_rate|sigma)": (?!null)|sample rate q =|noise multiplier σ =')
    files = [p for p in Path(coord_dir).rglob("*") if p.is_file() and "sites" not in p.relative_to(coord_dir).parts[:1]
             and not p.name.startswith("demo_site_")]
    files += [p for d in also for p in Path(d).rglob("*") if p.is_file()]
    assert files
    for p in files:
        text = p.read_bytes().decode("utf-8", errors="replace")
        found = keys.search(text)
        assert found is None, f"{p}: {found and found.group(0)}"
        for fig, site in figures.items():
            assert fig not in text, f"{p} holds {fig!r}, a figure of site {site.name}"


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
    report = json.loads(capsys.readouterr().out)
    assert report["finished"] and report["problems"] == []
    guarantees = {g["site"]: g for g in report["sites"]}
    for name, target in (("a", 8.0), ("b", 4.0)):
        ledger = PrivacyLedger.for_run(f["sites"][name])
        plan = ledger.latest("dp_plan")
        done = ledger.latest("dp_complete")
        assert plan["planned_steps"] == 8 and plan["target_epsilon"] == target
        assert done is not None and done["steps_done"] == 8 and done["epsilon_pld"] <= target
        assert ledger.summary().epsilon == pytest.approx(done["epsilon_pld"]) and ledger.summary().within_target
        assert len([e for e in ledger.entries() if e["kind"] == "dp_plan"]) == 1  # planned once, never recalibrated
        # the coordinator's record matches the site's ledger, on facts that do not depend on N
        g = guarantees[name]
        assert g["epsilon"] == target and g["epsilon_kind"] == "at most the site's budget"  # add/remove: the budget
        assert g["steps_done"] == 8 and g["within_budget"] and g["neighbouring"] == plan["neighbouring"]
        assert g["delta"] == plan["delta"] and g["unit"] == plan["unit"] == "per image"
        assert g["complete"] and g["confirmed_at_finish"] and g["rounds_contributed"] == [1, 2]
        progress = [e for e in _entries(f["coord"], "fed_site_progress") if e["site"] == name]
        by_round = {e["round"]: e["progress"]["steps_done"] for e in progress}
        site_rounds = {e["round"]: e["last_step"] for e in ledger.entries() if e["kind"] == "fed_round_done"}
        assert by_round == site_rounds
        assert all(e["progress"]["preflight_passed"] and e["progress"]["noisy"] for e in progress)
    # no site told the coordinator its data size or what it follows from
    _assert_no_site_figures(f["coord"], f["sites"].values())


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


# ----------------------------------------------------------------------------- a site's rounds, in process


def _global_model(fed):
    from dpgen.federated import local_training as lt
    from dpgen.federated.config import coordinator_run_config
    from dpgen.models import ConditionalDiffusion, diffusion_spec_from_config

    spec = diffusion_spec_from_config(coordinator_run_config(fed, [1, 28, 28]), (1, 28, 28))
    model = ConditionalDiffusion(spec)
    weights = {n: v.detach().float().numpy().copy() for n, v in model.state_dict().items()}
    return lt.GlobalModel("diffusion", spec.to_dict(), fed.model.model_dump(mode="json"), fed.data.num_classes, "all",
                          list(weights), lt._trainable_names("diffusion", spec.to_dict(), "all"), weights)


def test_site_rounds_run_the_registered_plan_on_the_one_loop(tmp_path, monkeypatch):
    """A site's rounds are steps of its one registered plan, run by dpgen's DP-SGD loop: the plan
    is calibrated once, the preflight runs once per process, the Poisson masks come from the
    site's own secret (its run directory), and a round killed mid-way resumes exactly."""
    import shutil

    import torch

    from dpgen.federated import local_training as lt
    from dpgen.federated.config import federation_from_dict, load_site_config
    from dpgen.federated.site import open_site_dir
    from dpgen.privacy import dpsgd
    from dpgen.privacy.randomness import read_secret
    from dpgen.training.dp import SampledCounts

    cfg = _fed_config(_free_port())
    cfg["sites"]["a"]["finetune"].update(batch_size=4, physical_batch_size=4)  # ~4 rows a step: quick
    p = tmp_path / "f.yaml"
    p.write_text(yaml.safe_dump(cfg))
    fed = federation_from_dict(cfg)
    gm = _global_model(fed)
    site_file = load_site_config(p, "a")
    a = open_site_dir(tmp_path / "a", site_file, "a")
    plan = lt.plan_site(a)
    read_secret(a.rd.internal)  # the site's secret exists before the copy: b is the same site
    shutil.copytree(a.root, tmp_path / "b")
    b = lt.SiteRun("a", site_file, tmp_path / "b")
    calls = {"calibrate": 0}
    real_plan = dpsgd.plan_dpsgd

    def counting(*args, **kwargs):
        calls["calibrate"] += 1
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(dpsgd, "plan_dpsgd", counting)
    monkeypatch.setattr("dpgen.training.dp.plan_dpsgd", counting)

    r1 = lt.local_round(a, gm, 1)
    gm2 = gm.with_weights({n: gm.weights[n] + r1.update[n] if n in r1.update else gm.weights[n] for n in gm.names})
    r2 = lt.local_round(a, gm2, 2)
    led = PrivacyLedger.for_run(a.root)
    assert calls["calibrate"] == 0  # rounds read the registered plan
    assert [e["kind"] for e in led.entries()].count("dp_plan") == 1
    assert [e["kind"] for e in led.entries()].count("preflight") == 1  # once per process, on this module
    assert [(e["first_step"], e["last_step"]) for e in led.entries() if e["kind"] == "fed_round_start"] == [(0, 4), (4, 8)]
    assert r2.facts.complete and r2.facts.steps_done == 8 and r2.facts.within_budget and r2.facts.preflight_passed
    done = led.latest("dp_complete")
    assert done["steps_done"] == 8 and done["epsilon_pld"] <= 8.0 and led.latest("bound") is not None
    # the masks are the secret streams of the site's run directory at the plan's step indices
    from dpgen.training.dp import run_secret

    secret = run_secret(a.rd)
    units = lt._units(lt.load_site_data(a))
    counts = SampledCounts.read(a.rd.internal / "sampling" / "dp_sgd_finetune.jsonl")
    assert sorted(counts) == list(range(8))
    assert all(counts[i] == len(dpsgd.sample_units(units, plan.plan.sample_rate, secret, i)) for i in range(8))
    # nothing the site reports depends on N
    facts = json.dumps(r2.facts.model_dump(mode="json"))
    assert "epsilon" not in facts.replace("epsilon_replace_one\": null", "") and "sample_rate" not in facts

    # site b (a copy of a before round 1) is killed at step 3 of round 1, then resumes
    real_step = dpsgd.DPSGDLoop.step
    state = {"failed": False}

    def dying(self, i):
        if i == 3 and not state["failed"]:
            state["failed"] = True
            raise KeyboardInterrupt
        return real_step(self, i)

    monkeypatch.setattr(dpsgd.DPSGDLoop, "step", dying)
    with pytest.raises(KeyboardInterrupt):
        lt.local_round(b, gm, 1)
    rb = lt.local_round(b, gm, 1)
    for n in r1.update:
        assert torch.equal(torch.from_numpy(rb.update[n]), torch.from_numpy(r1.update[n])), n
    b_done = PrivacyLedger.for_run(b.root).latest("fed_round_done")
    assert b_done["resumed_from"] == 2 and b_done["update_sha256"] == led.latest("fed_round_done", round=1)["update_sha256"]


# ----------------------------------------------------------------------------- a demo run, released


def _npz_of_shape(path: Path, side: int, n: int = 40) -> Path:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (n, side, side), dtype=np.uint8)
    labels = rng.integers(0, 2, (n, 1))
    np.savez(path, train_images=imgs, train_labels=labels, val_images=imgs[:4], val_labels=labels[:4],
             test_images=imgs[:4], test_labels=labels[:4])
    return path


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`dpgen federated demo` with two sites that train one round (SecAgg+) and a third whose
    images have another size (it refuses at the status query)."""
    root = tmp_path_factory.mktemp("demo")
    cfg = _fed_config(9092)
    cfg["coordinator"]["rounds"] = 1
    for name in ("a", "b"):
        cfg["sites"][name]["finetune"].update(rounds=1, local_steps=2, checkpoint_every=2)
    c = copy.deepcopy(cfg["sites"]["a"])
    c.update(data={"source": str(_npz_of_shape(root / "big.npz", 32))}, rows=None)
    cfg["sites"]["c"] = c
    path = root / "fed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = root / "run"
    t0 = time.time()
    out = subprocess.run(_cli("demo", str(path), "--run-dir", str(run_dir)), env=_env(), capture_output=True,
                         text=True, timeout=TIMEOUT)
    return {"root": root, "dir": run_dir, "out": out, "seconds": time.time() - t0}


def test_demo_release_states_the_guarantee_per_site(demo_run, tmp_path, capsys):
    from dpgen.cli import main

    d, out = demo_run["dir"], demo_run["out"]
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    sites = {n: d / "sites" / n for n in ("a", "b")}
    # the coordinator's files hold no site's section (the sites have their own files under sites/)
    assert "sites: {}" in (d / "config.yaml").read_text() and "rows" not in (d / "federation.yaml").read_text()

    assert main(["release", str(d), str(tmp_path / "bundle")]) == 0
    capsys.readouterr()
    card = json.loads((tmp_path / "bundle" / "dataset_card.json").read_text())
    p = card["privacy"]
    assert p["epsilon"] is None and p["neighbouring"] == "per site" and "no single ε" in p["meaning"]
    rows = {r["site"]: r for r in p["sites"]}
    assert sorted(rows) == ["a", "b"]
    for name, budget in (("a", 8.0), ("b", 4.0)):
        r = rows[name]
        assert r["epsilon"] == budget and r["epsilon_kind"].startswith("the site's budget") and r["delta"] == 1e-5
        assert r["unit"] == "per image" and r["neighbouring"] == "add_remove" and r["within_budget"]
        assert r["rounds_contributed"] == [1] and r["complete"] and r["confirmed_at_finish"]
        assert "reported by the site" in r["source"]
    f = p["federation"]
    assert [x["site"] for x in f["did_not_take_part"]] == ["c"] and "(1, 32, 32)" in f["did_not_take_part"][0]["reason"]
    assert f["secure_aggregation"][0]["enabled"] and f["secure_aggregation"][0]["protocol"].startswith("SecAgg+")
    assert "cannot verify" in f["reported_not_verified"] and "no composition across sites" in f["no_bound_across_sites"]
    md = (tmp_path / "bundle" / "dataset_card.md").read_text()
    assert "| a | ≤ 8 | 1e-05 | per image | add/remove | 1 |" in md and "| b | ≤ 4 | 1e-05 | per image |" in md
    assert "Did not take part: site `c`" in md and "Secure aggregation: SecAgg+" in md and "No bound across sites" in md
    # DIR/sites/ is one left-out entry, never listed file by file, never bundled
    left = [x["path"] for x in card["left_out"]]
    assert "sites/" in left and not any(x.startswith("sites/") and x != "sites/" for x in left)
    assert not any("sites" in q.relative_to(tmp_path / "bundle").parts for q in (tmp_path / "bundle").rglob("*"))
    # nothing the coordinator holds, nor the bundle, states a site's N or what it follows from
    _assert_no_site_figures(d, sites.values(), also=[tmp_path / "bundle"])

    # `dpgen privacy report` and `dpgen sample` work on the coordinator's directory
    assert main(["privacy", "report", str(d), "--brief"]) == 0
    text = capsys.readouterr().out
    assert "no single epsilon" in text and "site a: epsilon <= 8" in text and "site c: no plan" not in text
    assert main(["sample", str(d), "--name", "more", "--num-images", "4", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "per-site privacy guarantees" in text and (d / "cohort" / "more" / "cohort.npz").is_file()
    more = PrivacyLedger.for_run(d).latest("artifact", name="cohort/more")
    assert more["privacy_source"] == {"kind": "post_processing", "mechanisms": ["dp_sgd:federated_finetune"], "note": ""}
    assert main(["finetune", str(d)]) == 2 and "federated coordinator" in capsys.readouterr().err
