"""DP fine-tuning on two CPU processes (gloo): the same privacy accounting as one process,
the same DP-SGD update, and model replicas that stay identical across ranks."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import torch
import torch.multiprocessing as mp
import yaml
from torch import nn
from torch.nn import functional as F

from dpgen.privacy.ledger import PrivacyLedger

STEPS, SAMPLE_RATE, N_SUBJECTS = 4, 0.4, 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dp_steps(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """A few DP-SGD steps of a small conv classifier (deterministic loss, subjects with two
    images each) on `world_size` gloo processes; saves this rank's final weights."""
    import torch.distributed as dist

    from dpgen.distributed import rank_share, world
    from dpgen.privacy.engine import DPSGD, PrivacyUnits, step_generator

    torch.set_num_threads(1)
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2 * N_SUBJECTS, 1, 8, 8, generator=g), torch.randint(0, 3, (2 * N_SUBJECTS,), generator=g)
    units = PrivacyUnits.from_subjects(np.repeat(np.arange(N_SUBJECTS), 2), len(x))
    dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.5), noise_multiplier=1.0, max_grad_norm=0.3,
               expected_batch_size=SAMPLE_RATE * len(units))
    sizes = []
    for step in range(STEPS):
        chosen = units.poisson_sample(SAMPLE_RATE, step_generator(0, step, "poisson"))
        mine = rank_share(chosen, world())
        sizes.append(len(mine))
        dp.step(units.physical_chunks(mine, 6), lambda i, rows, k: {"x": x[rows], "y": y[rows]},
                lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none"), 1,
                step_generator(123, step, "noise"))
    model = dp.close()
    np.savez(os.path.join(out_dir, f"w{world_size}-r{rank}.npz"), sizes=np.array(sizes),
             **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    if world_size > 1:
        dist.destroy_process_group()


def test_two_gloo_processes_take_the_single_process_dp_step(tmp_path):
    """Clipped sums all-reduced, noise added once (rank 0), divided by the expected batch:
    the update equals the single-process one, on both ranks."""
    _dp_steps(0, 1, 0, str(tmp_path))
    mp.spawn(_dp_steps, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single, r0, r1 = (dict(np.load(tmp_path / f)) for f in ("w1-r0.npz", "w2-r0.npz", "w2-r1.npz"))
    # every sampled unit went to exactly one rank
    np.testing.assert_array_equal(r0.pop("sizes") + r1.pop("sizes"), single.pop("sizes"))
    torch.manual_seed(0)
    initial = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    for k, w in single.items():
        assert np.array_equal(r0[k], r1[k]), f"{k}: replicas differ across ranks"
        np.testing.assert_allclose(r0[k], w, rtol=1e-5, atol=1e-6, err_msg=k)
        assert not np.allclose(w, initial.state_dict()[k].numpy()), f"{k} did not train"


def _dpgen(*args):
    return [sys.executable, "-m", "dpgen.cli", *args, "--no-progress"]


def test_torchrun_finetune_keeps_the_accounting_and_the_replicas(tmp_path, tiny_raw):
    tiny_raw["finetune"].update({"steps": 6, "checkpoint_every": 2})
    cfg = tmp_path / "dist.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    single, multi = tmp_path / "single", tmp_path / "multi"

    pre = subprocess.run(_dpgen("pretrain", str(cfg), "--run-dir", str(single)), env=env, capture_output=True, text=True)
    assert pre.returncode == 0, pre.stderr[-3000:]
    shutil.copytree(single, multi)

    one = subprocess.run(_dpgen("finetune", str(single)), env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "dpgen.cli", "finetune", str(multi), "--device", "cpu", "--no-progress", "--json"]
    two = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    result = json.loads(two.stdout[two.stdout.index("{"):])["stages"]["finetune"]  # printed once, by rank 0
    assert result["world_size"] == 2
    assert len(result["rank_digests"]) == 2 and len(set(result["rank_digests"])) == 1

    a, b = PrivacyLedger(single / "privacy" / "ledger.jsonl"), PrivacyLedger(multi / "privacy" / "ledger.jsonl")
    for kind, keys in (("dp_plan", ("sigma", "sample_rate", "planned_steps", "unit", "n_units")),
                       ("dp_complete", ("steps_done", "sample_rate", "sigma", "epsilon_pld", "epsilon_rdp", "unit"))):
        ea, eb = a.latest(kind), b.latest(kind)
        assert {k: ea[k] for k in keys} == {k: eb[k] for k in keys}, kind
    assert b.latest("dp_complete")["world_size"] == 2
    assert a.summary(1e-5).epsilon == b.summary(1e-5).epsilon <= 8.0
    # rank 0 alone wrote the ledger: one line per fact, no duplicates from rank 1
    kinds = [e["kind"] for e in b.entries()]
    assert kinds.count("dp_plan") == 1 and kinds.count("dp_complete") == 1 and kinds.count("preflight") == 1
    progress = [e["steps_done"] for e in b.entries() if e["kind"] == "dp_progress"]
    assert progress == [2, 4, 6]
    assert (multi / "checkpoints" / "finetune.safetensors").is_file()


def test_run_refuses_a_multi_process_launch(tmp_path, tiny_raw):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw))
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0"}
    res = subprocess.run(_dpgen("run", str(cfg), "--run-dir", str(tmp_path / "r")), env=env, capture_output=True,
                         text=True)
    assert res.returncode == 2 and "only `dpgen finetune RUN_DIR` runs distributed" in res.stderr
