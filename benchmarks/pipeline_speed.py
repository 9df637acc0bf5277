"""Pipeline speed on this machine: pretrain and DP fine-tune throughput and peak memory, sampling
throughput, evaluation time, for the quickstart config (and the GPU config when a GPU is present);
plus the quality table of a sweep directory.

    DPGEN_DATA_DIR=../shared/data python benchmarks/pipeline_speed.py [--threads 1] [--sweep SWEEP_DIR] [--write-results]

Each stage runs for a few steps through the real stage functions (`dpgen.pipeline.pretrain_stage`,
`finetune_stage`, `sample_stage`, `dpgen.evaluation.evaluate_stage`) in a throwaway run directory:
- throughput (images/s) is steady-state: from the wall-clock times TensorBoard records for each
  step, first step excluded (it pays for lazy initialisation); the DP fine-tune counts the units its
  Poisson batches actually held (`finetune/batch_units`), each with `noise_multiplicity` noise draws;
- stage time is the whole call (data loading, model building, the preflight, checkpoints);
- peak memory: CPU: the process's peak resident set size during the stage (Linux VmHWM, reset before
  each stage; else getrusage's lifetime maxrss); GPU: torch.cuda.max_memory_allocated;
- sampling throughput: images of the cohort / stage time, at the config's sampler and step count.
`--write-results` replaces this script's section of benchmarks/RESULTS.md (between its markers) and
leaves every other section as it is.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- pipeline_speed:begin -->", "<!-- pipeline_speed:end -->"
QBEGIN, QEND = "<!-- pipeline_quality:begin -->", "<!-- pipeline_quality:end -->"
GPU_CONFIG = REPO / "configs" / "breast_eps10.yaml"
CPU_CONFIG = REPO / "configs" / "quickstart.yaml"


# ----------------------------------------------------------------------------- machine, memory


def machine() -> dict:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load"] = os.getloadavg()[0]
    except OSError:
        info["load"] = None
    return info


def _vmhwm_kb() -> int | None:
    try:
        m = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
    except OSError:
        pass


def peak_memory(device) -> str:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU (max allocated)"
    kb = _vmhwm_kb()
    if kb is not None:
        return f"{kb / 2**20:.2f} GiB RSS (peak)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process lifetime peak)"


def _scalars(logdir: Path, tag: str) -> list[tuple[float, int, float]]:
    """(wall_time, step, value) of one TensorBoard scalar tag, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return []
    return sorted(((e.wall_time, e.step, e.value) for e in acc.Scalars(tag)), key=lambda x: x[1])


def _loss_tag(logdir: Path) -> str:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return next((t for t in acc.Tags().get("scalars", []) if t.endswith("/loss")), "loss")


def steady_rate(events: list[tuple[float, int, float]], per_step: list[float]) -> float | None:
    """Images per second between the first and the last logged step (the first step excluded)."""
    if len(events) < 3:
        return None
    dt = events[-1][0] - events[0][0]
    work = sum(per_step[1:])
    return work / dt if dt > 0 else None


# ----------------------------------------------------------------------------- one config


def bench_config(path: Path, args, device) -> dict:
    import torch

    from dpgen.config import load_config
    from dpgen.pipeline import check_sources, finetune_stage, pretrain_stage, sample_stage
    from dpgen.rundir import RunDir

    overrides = [f"pretrain.steps={args.pretrain_steps}", f"pretrain.checkpoint_every={args.pretrain_steps}",
                 f"finetune.steps={args.finetune_steps}", f"finetune.checkpoint_every={args.finetune_steps}",
                 f"sample.num_images={args.sample_images}"]
    cfg = load_config(path, overrides)
    check_sources(cfg)
    out: dict = {"config": path.name, "device": str(device)}
    with tempfile.TemporaryDirectory(prefix="dpgen-bench-") as tmp:
        rd = RunDir.create(Path(tmp) / "run", cfg)

        reset_peak(device)
        t = time.time()
        res = pretrain_stage(cfg, rd, device=device, progress=False)
        out["pretrain_s"] = time.time() - t
        out["pretrain_mem"] = peak_memory(device)
        ev = _scalars(rd.logs / "pretrain", "pretrain/loss")
        out["pretrain_ips"] = steady_rate(ev, [cfg.pretrain.batch_size] * len(ev))
        out["parameters"] = res.get("parameters")

        reset_peak(device)
        t = time.time()
        res = finetune_stage(cfg, rd, device=device, progress=False)
        out["finetune_s"] = time.time() - t
        out["finetune_mem"] = peak_memory(device)
        units = _scalars(rd.logs / "finetune", "finetune/batch_units")
        loss = _scalars(rd.logs / "finetune", _loss_tag(rd.logs / "finetune"))
        out["finetune_ips"] = steady_rate(loss, [u[2] for u in units]) if len(units) == len(loss) else None
        out["finetune_unit"] = res.get("unit")
        out["noise_multiplicity"] = cfg.finetune.noise_multiplicity
        out["finetune_expected_batch"] = cfg.finetune.batch_size

        reset_peak(device)
        t = time.time()
        res = sample_stage(cfg, rd, device=device, progress=False)
        out["sample_s"] = time.time() - t
        out["sample_ips"] = res["n"] / out["sample_s"]
        out["sample_mem"] = peak_memory(device)
        out["sampler"] = f"{cfg.sample.sampler}, {cfg.sample.steps} steps, batch {cfg.sample.batch_size}"

        if args.no_eval:
            out["eval"] = "skipped (--no-eval)"
        else:
            try:
                from dpgen.evaluation.stage import EvalOptions, evaluate_stage
            except ImportError as err:
                out["eval"] = f"skipped: dpgen.evaluation not importable ({err})"
            else:
                opts = EvalOptions()
                u = opts.utility_options
                u.seeds = args.eval_seeds
                if args.eval_epochs:
                    u.epochs = u.dp_epochs = u.synthetic_epochs = args.eval_epochs
                    u.finetune_epochs = max(1, args.eval_epochs // 2)
                reset_peak(device)
                t = time.time()
                m = evaluate_stage(cfg, rd, device=device, progress=False, options=opts)
                out["eval_s"] = time.time() - t
                out["eval_mem"] = peak_memory(device)
                out["eval_timing"] = m.get("timing")
                out["eval"] = (f"{u.seeds} seed(s), classifier epochs {u.epochs} (DP rows {u.dp_epochs}), "
                               f"encoder epochs {opts.encoder_epochs}, cohort {args.sample_images} images")
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return out


def _n(v, fmt="{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def format_config(r: dict) -> list[str]:
    if "skipped" in r:
        return [f"### {r['config']}", "", f"skipped: {r['skipped']}", ""]
    unit = (r.get("finetune_unit") or "per image").removeprefix("per ")
    lines = [f"### {r['config']} on {r['device']} ({_n(r.get('parameters'), '{:,}')} UNet parameters)", "",
             "| stage | throughput | stage time | peak memory | notes |", "|---|---|---|---|---|",
             f"| public pretrain | {_n(r.get('pretrain_ips'))} images/s | {_n(r['pretrain_s'])} s | {r['pretrain_mem']} | "
             f"{r['pretrain_steps']} steps |",
             f"| DP fine-tune | {_n(r.get('finetune_ips'))} {unit}s/s | {_n(r['finetune_s'])} s | {r['finetune_mem']} | "
             f"{r['finetune_steps']} steps, expected batch {r['finetune_expected_batch']}, K = {r['noise_multiplicity']} "
             f"noise draws; stage time includes the preflight |",
             f"| sampling | {_n(r.get('sample_ips'), '{:.2f}')} images/s | {_n(r['sample_s'])} s | {r['sample_mem']} | "
             f"{r['sample_images']} images, {r['sampler']} |"]
    if r.get("eval_s") is not None:
        t = r.get("eval_timing") or {}
        parts = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in t.items() if k != "total_s" and isinstance(v, (int, float)))
        lines.append(f"| evaluation | - | {_n(r['eval_s'])} s | {r['eval_mem']} | {r['eval']}; {parts} |")
    else:
        lines.append(f"| evaluation | - | - | - | {r.get('eval')} |")
    return lines + [""]


def quality_table(sweep_dir: Path) -> list[str]:
    import json

    p = sweep_dir / "sweep.json"
    if not p.is_file():
        return [f"no sweep.json in {sweep_dir}"]
    res = json.loads(p.read_text())

    def num(v, d=3):
        try:
            f = float(v)
        except (TypeError, ValueError):
            return "-"
        return "∞" if math.isinf(f) else f"{f:.{d}f}"

    fd_name = next((pt.get("fd_name") for pt in res.get("points") or [] if pt.get("fd_name")), "FD")
    lines = [f"Sweep `{res.get('config')}` (δ = {res.get('delta')}), {len(res.get('runs') or [])} fine-tunes sharing one public "
             f"pretraining; ROC-AUC on the private test split; {fd_name}: cohort vs private train, reference real vs real.", "",
             f"| ε target | ε spent | {fd_name} | FD real vs real | TSTR AUC | DP-SGD baseline AUC | synthetic + DP fine-tune AUC | "
             "non-private ceiling AUC | time: fine-tune / sample / evaluate |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res.get("runs") or []:
        pt = r.get("point") or {}

        def pm(key, std):
            return num(pt.get(key)) + (f" ± {num(pt.get(std), 3)}" if pt.get(std) not in (None, 0, 0.0) else "")

        lines.append(f"| {num(r.get('epsilon'), 2)} | {num(r.get('spent_epsilon'), 3)} | {num(pt.get('fd'), 4)} | "
                     f"{num(pt.get('fd_real'), 4)} | {pm('tstr_auc', 'tstr_std')} | {pm('dp_sgd_auc', 'dp_sgd_std')} | "
                     f"{pm('ft_auc', 'ft_std')} | {pm('ceiling_auc', 'ceiling_std')} | "
                     + " / ".join(num((r.get("timing") or {}).get(k), 0) + " s" for k in ("finetune_s", "sample_s", "evaluate_s"))
                     + " |")
    pre = (res.get("timing") or {}).get("pretrain_s")
    if pre is not None:
        lines += ["", f"The public pretraining ran once for the whole sweep: {num(pre, 0)} s."]
    return lines + [""]


def write_results(section: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the text between `begin` and `end` in RESULTS.md (append the block if absent)."""
    block = f"{begin}\n{section.rstrip()}\n{end}\n"
    text = RESULTS.read_text() if RESULTS.is_file() else "# Benchmark results\n\nLatest figures, with the machine they were measured on.\n\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    RESULTS.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(CPU_CONFIG), help="the CPU config (default configs/quickstart.yaml)")
    ap.add_argument("--gpu-config", default=str(GPU_CONFIG), help="measured only when CUDA is available")
    ap.add_argument("--pretrain-steps", type=int, default=12)
    ap.add_argument("--finetune-steps", type=int, default=6)
    ap.add_argument("--sample-images", type=int, default=100)
    ap.add_argument("--gpu-config-on-cpu", action="store_true",
                    help="without a GPU, time the GPU config on the CPU too (per-step figures; slow)")
    ap.add_argument("--no-eval", action="store_true", help="skip the evaluation timing")
    ap.add_argument("--eval-seeds", type=int, default=1, help="classifier seeds for the evaluation timing (default 1)")
    ap.add_argument("--eval-epochs", type=int, default=None, help="classifier epochs (default: the evaluation's own)")
    ap.add_argument("--sweep", default=None, metavar="DIR", help="print the quality table of this sweep directory")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-speed", action="store_true", help="skip the speed measurements (e.g. only --sweep's quality table)")
    ap.add_argument("--write-results", action="store_true",
                    help="update this script's sections of benchmarks/RESULTS.md (speed, and quality with --sweep)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    shared = REPO.parent / "shared" / "data"
    if not os.environ.get("DPGEN_DATA_DIR") and shared.is_dir():
        os.environ["DPGEN_DATA_DIR"] = str(shared)
    os.environ.setdefault("DPGEN_OFFLINE", "1")

    m = machine()
    head = ["## Pipeline speed (`benchmarks/pipeline_speed.py`)", "",
            f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['threads']} thread(s)), "
            f"GPU: {m['gpu'] or 'none'}; python {m['python']}; 1-min load average at start "
            f"{_n(m['load'], '{:.1f}')} (other jobs share this machine: throughput here is a lower bound).",
            f"Measured {time.strftime('%Y-%m-%d')} with `python benchmarks/pipeline_speed.py "
            + " ".join(a for a in sys.argv[1:] if a != "--write-results") + "`.", ""]
    print("\n".join(head), flush=True)
    sections = []
    for path, want_gpu in () if args.no_speed else ((Path(args.config), False), (Path(args.gpu_config), True)):
        if want_gpu and not torch.cuda.is_available() and not args.gpu_config_on_cpu:
            r = {"config": path.name, "skipped": "no GPU (this config is sized for one GPU; --gpu-config-on-cpu "
                                                 "measures it here anyway)"}
        else:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            r = bench_config(path, args, device)
            r.update(pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps, sample_images=args.sample_images)
        text = format_config(r)
        print("\n".join(text), flush=True)
        sections += text
    quality = []
    if args.sweep:
        quality = ["### Quality (`dpgen sweep`)", "", f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; "
                   f"sweep directory {Path(args.sweep).name}, read {time.strftime('%Y-%m-%d')}.", ""] + quality_table(Path(args.sweep))
        print("\n".join(quality))
    if args.write_results:
        if sections:
            write_results("\n".join(head + sections))
        if quality:
            write_results("\n".join(quality), QBEGIN, QEND)
        print(f"wrote {RESULTS.relative_to(REPO)} (this script's sections, between its <!-- pipeline_* --> markers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
