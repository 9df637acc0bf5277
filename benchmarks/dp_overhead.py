"""What does DP-SGD cost per step on the quickstart model, on this machine?

    python benchmarks/dp_overhead.py [--batch 32] [--reps 10] [--warmup 3] [--threads 2] [--mode hooks]

Builds the quickstart diffusion UNet (configs/quickstart.yaml, 28x28x1, untrained weights: speed
does not depend on them) and times three kinds of training step on the same batch size:
  nonprivate  objective.loss(...).mean().backward() + AdamW step (what pretraining does);
  dp_k1       DPSGD.step with one physical chunk of `batch` rows, one unit per row,
              noise multiplicity K = 1, noise on (what fine-tuning does);
  dp_k4       the same with K = 4 (four forward/backward passes over the chunk, folded into
              one per-unit gradient; 4x the rows of the other two).
Timing: one process, the variants round-robin (warmup rounds, then `reps` measured rounds), so
load from other jobs on a shared machine hits all of them alike; medians and ratios to the
non-private median are printed.
Memory: each variant again in its own fresh subprocess, with glibc's malloc told to give every
allocation over 64 KiB back to the OS on free (MALLOC_MMAP_THRESHOLD_), so the resident set
follows live tensors. After warmup the kernel's peak-RSS counter is reset
(/proc/self/clear_refs), then `reps` steps run; "step peak" = VmHWM after - VmRSS before, i.e.
the most memory a step needs beyond the model, optimizer state and data that are already
resident. Also printed: the size of the per-sample gradient buffers (rows x parameters x 4
bytes), the dominant term of DP-SGD's extra memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("nonprivate", "dp_k1", "dp_k4")


def build(variant: str, batch: int, mode: str):
    """Model + a `step(rep)` closure for one variant; each variant owns its model copy."""
    from dpgen.config import load_config
    from dpgen.models import ConditionalDiffusion, diffusion_spec_from_config
    from dpgen.privacy.engine import DPSGD, make_conv_inputs_contiguous, step_generator
    from dpgen.training.objectives import DiffusionObjective

    cfg = load_config(REPO / "configs/quickstart.yaml")
    shape = (1, 28, 28)
    torch.manual_seed(0)
    model = ConditionalDiffusion(diffusion_spec_from_config(cfg, shape)).train()
    objective = DiffusionObjective(model, cfg.model.cond_drop_prob)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand((batch, *shape), generator=g) * 2 - 1
    labels = torch.randint(0, cfg.data.num_classes, (batch,), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.finetune.lr, weight_decay=0.0)
    n_params = sum(p.numel() for p in model.parameters())

    if variant == "nonprivate":
        def step(rep: int) -> None:
            b = objective.draw(x0, labels, step_generator(0, rep, "draw"))
            opt.zero_grad(set_to_none=True)
            objective.loss(model, b).mean().backward()
            opt.step()

        return step, n_params

    K = 1 if variant == "dp_k1" else 4
    make_conv_inputs_contiguous(model)
    dp = DPSGD(model, opt, noise_multiplier=1.0, max_grad_norm=cfg.finetune.max_grad_norm,
               expected_batch_size=batch, grad_sample_mode=mode)
    rows = np.arange(batch)
    chunks = [(rows, np.arange(batch), batch)]  # one unit per row, one physical chunk

    def step(rep: int) -> None:
        def make_batch(chunk: int, r: np.ndarray, k: int) -> dict:
            return objective.draw(x0[r], labels[r], step_generator(0, rep, f"draw:{chunk}:{k}"))

        dp.step(chunks, make_batch, objective.loss, K, step_generator(0, rep, "noise"))

    return step, n_params


def time_all(batch: int, reps: int, warmup: int, mode: str) -> dict[str, list[float]]:
    steps = {v: build(v, batch, mode)[0] for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    for rnd in range(warmup + reps):
        for v in VARIANTS:
            t = time.perf_counter()
            steps[v](rnd)
            dt = time.perf_counter() - t
            if rnd >= warmup:
                times[v].append(dt)
    return times


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def memory_child(variant: str, batch: int, reps: int, warmup: int, mode: str) -> dict:
    step, n_params = build(variant, batch, mode)
    for r in range(warmup):
        step(r)
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for r in range(warmup, warmup + reps):
        step(r)
    return {"variant": variant, "rss_before": before, "hwm": _status("VmHWM"), "n_params": n_params}


def measure_memory(variant: str, args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--child", variant, "--batch", str(args.batch), "--reps", str(args.mem_reps),
           "--warmup", "2", "--threads", str(args.threads), "--mode", args.mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess for {variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=10, help="measured rounds (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="warmup rounds (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--mode", choices=("hooks", "functorch"), default="hooks", help="Opacus grad-sample mode")
    ap.add_argument("--mem-reps", type=int, default=3, help="steps per memory subprocess (default 3)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import warnings
    warnings.filterwarnings("ignore")

    if args.child:
        print(json.dumps(memory_child(args.child, args.batch, args.reps, args.warmup, args.mode)))
        return 0

    import opacus

    load = os.getloadavg()[0]
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, opacus {opacus.__version__}, "
          f"torch threads {args.threads}, load average at start {load:.2f}")
    times = time_all(args.batch, args.reps, args.warmup, args.mode)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    base = med["nonprivate"]
    print(f"quickstart UNet, batch {args.batch}, Opacus {args.mode} mode, {args.reps} measured rounds "
          f"(+{args.warmup} warmup), variants interleaved; load average at end {os.getloadavg()[0]:.2f}")
    print(f"{'variant':<12} {'median s':>9} {'min s':>7} {'max s':>7} {'ratio':>6}")
    for v in VARIANTS:
        ts = times[v]
        print(f"{v:<12} {med[v]:9.3f} {min(ts):7.3f} {max(ts):7.3f} {med[v] / base:6.2f}x")
    # per-round ratios: robust to load that changes between rounds
    r1 = [a / b for a, b in zip(times["dp_k1"], times["nonprivate"])]
    r4 = [a / b for a, b in zip(times["dp_k4"], times["nonprivate"])]
    print(f"median of per-round ratios: dp_k1 {statistics.median(r1):.2f}x, dp_k4 {statistics.median(r4):.2f}x "
          f"(target: dp_k1 <= 1.5x)")

    if not args.no_memory:
        mem = {v: measure_memory(v, args) for v in VARIANTS}
        n_params = mem["nonprivate"]["n_params"]
        print(f"memory (separate subprocess per variant; step peak = VmHWM during {args.mem_reps} steps - VmRSS "
              f"before them; model has {n_params / 1e6:.2f}M parameters = {n_params * 4 / 2**20:.1f} MiB):")
        mb = {v: (m["hwm"] - m["rss_before"]) / 2**20 for v, m in mem.items()}
        for v in VARIANTS:
            print(f"{v:<12} resident before {mem[v]['rss_before'] / 2**20:7.1f} MiB, step peak +{mb[v]:7.1f} MiB "
                  f"({mb[v] / max(mb['nonprivate'], 1e-9):.2f}x)")
        gs = args.batch * n_params * 4 / 2**20
        print(f"per-sample gradient buffer: {args.batch} rows x {n_params / 1e6:.2f}M params x 4 B = {gs:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
