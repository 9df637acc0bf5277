"""`dpgen sweep CONFIG --epsilons 1,3,10,inf`: one public pretraining, one DP fine-tune per epsilon.

    SWEEP/
      pretrain/            a run directory holding only the public pretraining (done once)
      eps_1/ eps_3/ ...    one full run directory per epsilon: checkpoints/pretrain.safetensors is a
                           hard link to (or a copy of) the shared one, state.json marks pretrain done,
                           then finetune -> sample -> evaluate ran in it as in `dpgen run`
      eps_inf/             epsilon = inf: non-private fine-tuning (sigma 0, clipping still on)
      internal/sweep.json  per-epsilon results (spent epsilon, fidelity, the four utility rows)
      internal/curve.png   fidelity (FD) and downstream ROC-AUC vs epsilon (log x, inf at the right end),
                           with the non-private ceiling and the DP-SGD baseline as lines
                           (internal: the evaluation is computed on private data without DP)

Public pretraining costs no privacy, so sharing it across the epsilons changes nothing in any
run's ledger; each run's ledger holds only its own fine-tuning. Each epsilon is a separate
release candidate: the epsilons of different runs do not compose unless you release several.

Every run is evaluated (`dpgen evaluate`'s stage) unless the sweep is asked not to (`--no-evaluate`:
each run is marked "not evaluated" and the curve stays empty).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from dpgen.config import ConfigError, RunConfig, config_from_dict, load_config
from dpgen.rundir import RunDir, RunDirError, default_run_dir, to_jsonable, write_json_atomic

# Evaluation results are statistics of private data without DP: the sweep keeps them internal.
SWEEP_JSON = "internal/sweep.json"
CURVE_PNG = "internal/curve.png"
PRETRAIN_DIR = "pretrain"


def parse_epsilons(text: str | list) -> list[float]:
    """"1,3,10,inf" -> [1.0, 3.0, 10.0, inf] (sorted, unique; "inf", "∞" and ".inf" mean non-private)."""
    items = text if isinstance(text, list) else str(text).split(",")
    out = []
    for raw in items:
        s = str(raw).strip().lower()
        if not s:
            continue
        if s in ("inf", ".inf", "∞", "infinity", "+inf"):
            v = math.inf
        else:
            try:
                v = float(s)
            except ValueError:
                raise ConfigError(f"--epsilons: {raw!r} is not a number (use e.g. 1,3,10,inf)") from None
        if not v > 0 or math.isnan(v):
            raise ConfigError(f"--epsilons: {raw!r}: every epsilon must be > 0 (inf = non-private)")
        out.append(v)
    out = sorted(set(out))
    if not out:
        raise ConfigError("--epsilons: give at least one epsilon, e.g. 1,3,10,inf")
    return out


def eps_label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def eps_dirname(eps: float, repeat: int = 0) -> str:
    """eps_10 for the first fine-tune at epsilon 10, eps_10_rep2, eps_10_rep3 ... for the others."""
    return f"eps_{eps_label(eps)}" + (f"_rep{repeat + 1}" if repeat else "")



def _f(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def point_from_evaluation(epsilon: float | None, evaluation: dict | None) -> dict:
    """One point of the curve from a run's evaluation.json (None where a number is missing)."""
    from pydantic import ValidationError

    from dpgen.core.schemas import EvaluationResults

    try:
        ev = EvaluationResults.model_validate(evaluation if isinstance(evaluation, dict) else {})
    except ValidationError:
        ev = EvaluationResults()
    p: dict = {"epsilon": epsilon}
    for rid, key in (("synthetic", "tstr"), ("dp_real", "dp_sgd"), ("synthetic_then_dp_real", "ft"), ("real", "ceiling")):
        p[f"{key}_auc"], p[f"{key}_std"] = ev.auc(rid)
    base = ev.rows.get("dp_real")
    if base is not None and base.privacy is not None:
        p["dp_sgd_epsilon"] = base.privacy.epsilon
    fd = ev.fidelity.frechet() if ev.fidelity is not None else None
    p["fd_name"] = fd[0] if fd else None
    p["fd"] = fd[1].cohort if fd else None
    p["fd_real"] = fd[1].real_vs_real if fd else None
    return p


def _link_or_copy(src: Path, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
        return "hard link"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def _open_sweep_dir(root: Path, resume: bool, overwrite: bool, protect: tuple = ()) -> None:
    from dpgen.rundir import is_sweep_dir, overwrite_refusal

    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other: --resume continues the sweep in --run-dir, "
                          "--overwrite deletes it first; pass one")
    if root.exists() and not root.is_dir():
        raise RunDirError(f"--run-dir {root} is a file, not a directory; choose a folder path")
    exists = root.exists() and any(root.iterdir())
    if resume and not exists:
        raise RunDirError(f"--resume: there is no sweep in {root} (the directory is missing or empty); check the path, "
                          f"or start a new sweep without --resume")
    if resume and not is_sweep_dir(root):
        raise RunDirError(f"--resume: {root} is not a dpgen sweep directory (no {SWEEP_JSON}, no {PRETRAIN_DIR}/ run); "
                          f"check the path")
    if exists and overwrite:
        why = overwrite_refusal(root, kind="sweep directory", recognise=is_sweep_dir, protect=protect)
        if why:
            raise RunDirError(f"--overwrite refused: {why}")
        shutil.rmtree(root)
        exists = False
    if exists and not resume:
        if is_sweep_dir(root):
            raise RunDirError(f"sweep directory {root} already exists and is not empty; pass --resume to continue it "
                              f"or --overwrite to replace it (deletes it), or choose another --run-dir")
        raise RunDirError(f"{root} already exists and is not empty, and it is not a dpgen sweep directory; "
                          f"choose another --run-dir")
    root.mkdir(parents=True, exist_ok=True)


def sweep(
    config: RunConfig | str | Path,
    epsilons: list[float] | str,
    sweep_dir: str | Path | None = None,
    *,
    overrides: list[str] | None = None,
    device: str = "auto",
    progress: bool = True,
    evaluate: bool = True,
    eval_options: Any = None,
    resume: bool = False,
    overwrite: bool = False,
    repeats: int = 1,
    log=print,
) -> dict:
    """Run the sweep; returns (and writes) the sweep.json dict.

    `repeats`: DP fine-tunes per epsilon, each in its own run directory with its own secret seed
    (one DP fine-tune varies a lot from another); every figure of a point is the mean over them,
    with the standard deviation over them as its spread."""
    if int(repeats) < 1:
        raise ConfigError(f"--repeats {repeats}: need at least one fine-tune per epsilon")
    from dpgen.pipeline import check_sources, finetune_stage, pretrain_stage, read_paths, sample_stage

    config_path = None if isinstance(config, RunConfig) else Path(config)
    if not isinstance(config, RunConfig):
        config = load_config(config, overrides)
    eps_list = parse_epsilons(epsilons) if not isinstance(epsilons, list) else parse_epsilons([str(e) for e in epsilons])
    check_sources(config)
    root = Path(sweep_dir or default_run_dir(f"{config.name}-sweep"))
    _open_sweep_dir(root, resume, overwrite, protect=read_paths(config, config_path))
    log(f"sweep: directory {root}" + (" (resumed)" if resume else ""))
    t_all = time.time()

    # 1. the public pretraining, once
    # a sweep resumed before it reached a directory creates it
    pre = RunDir.create(root / PRETRAIN_DIR, config, resume=resume and (root / PRETRAIN_DIR).is_dir())
    timing: dict[str, float] = {}
    if not pre.is_done("pretrain"):
        t = time.time()
        pretrain_stage(config, pre, device=device, progress=progress)
        timing["pretrain_s"] = round(time.time() - t, 2)
        log(f"sweep: public pretraining done ({timing['pretrain_s']} s) -> {pre.root}")
    pre_info = pre.state()["completed"]["pretrain"]
    weights = pre.pretrain_weights
    pre_datasets = {k: v for k, v in ((RunDir.read_json(pre.manifest_path) or {}).get("datasets") or {}).items()
                    if k.startswith("public/")}

    from dpgen.evaluation.stage import evaluate_stage

    eval_note = None if evaluate else "evaluation skipped (--no-evaluate)"
    old = (RunDir.read_json(root / SWEEP_JSON) or {}) if resume else {}
    old_timing = {r.get("run_dir"): r.get("timing") or {} for r in old.get("runs") or [] if isinstance(r, dict)}
    timing = {**(old.get("timing") or {}), **timing}
    runs = []
    for eps, rep in [(e, r) for e in eps_list for r in range(int(repeats))]:
        raw = config.to_dict()
        raw["privacy"]["epsilon"] = eps
        raw["name"] = f"{config.name}-{eps_dirname(eps)}"
        cfg = config_from_dict(raw)
        name = eps_dirname(eps, rep)
        rd = RunDir.create(root / name, cfg, resume=resume and (root / name).is_dir())
        rec: dict = {"epsilon": eps, "repeat": rep + 1, "run_dir": name, "timing": {}}
        if not rd.is_done("pretrain"):
            how = _link_or_copy(weights, rd.pretrain_weights)
            if pre_datasets:
                rd.record_datasets(pre_datasets)
            rd.mark_done("pretrain", {k: v for k, v in pre_info.items() if k != "time"} |
                         {"shared_from": f"../{PRETRAIN_DIR}/{pre.rel(weights)}", "shared_as": how})
        for name, fn in (("finetune", finetune_stage), ("sample", sample_stage)):
            if rd.is_done(name):
                continue
            t = time.time()
            fn(cfg, rd, device=device, progress=progress)
            rec["timing"][f"{name}_s"] = round(time.time() - t, 2)
        evaluation = None
        if evaluate:
            if rd.is_done("evaluate") and rd.evaluation_file.is_file():
                evaluation = RunDir.read_json(rd.evaluation_file)
            else:
                _share_public_encoder(root, eps_list, rd)
                t = time.time()
                kwargs = {"options": eval_options} if eval_options is not None else {}
                evaluation = evaluate_stage(cfg, rd, device=device, progress=progress, **kwargs)
                rec["timing"]["evaluate_s"] = round(time.time() - t, 2)
            rec["evaluated"] = True
        else:
            rec["evaluated"] = False
            rec["note"] = f"not evaluated: {eval_note}"
        rec["timing"] = {**old_timing.get(rec["run_dir"], {}), **rec["timing"]}  # a resumed sweep keeps earlier timings
        spent = _spent_epsilon(rd, cfg)
        rec["spent_epsilon"] = spent
        rec["point"] = {**point_from_evaluation(eps, evaluation), "spent_epsilon": spent}
        runs.append(rec)
        log(f"sweep: epsilon {eps_label(eps)} (fine-tune {rep + 1}/{repeats}): spent "
            f"{eps_label(spent) if spent is not None else '?'}"
            + (f", TSTR AUC {rec['point']['tstr_auc']:.3f}, DP-SGD AUC {rec['point']['dp_sgd_auc']:.3f}"
               if rec["point"].get("tstr_auc") is not None and rec["point"].get("dp_sgd_auc") is not None else "")
            + f" -> {rd.root}")

    points = [aggregate_point(eps, [r["point"] for r in runs if r["epsilon"] == eps]) for eps in eps_list]
    ceilings = [p["ceiling_auc"] for p in points if p.get("ceiling_auc") is not None]
    ceiling = sum(ceilings) / len(ceilings) if ceilings else None
    result = {
        "config": config.name,
        "sweep_dir": str(root),
        "epsilons": eps_list,
        "repeats": int(repeats),
        "spread": ("std over the DP fine-tunes of each epsilon (each figure first averaged over classifier seeds)"
                   if repeats > 1 else "std over classifier seeds (one DP fine-tune per epsilon)"),
        "delta": config.privacy.delta,
        "pretrain": {"run_dir": PRETRAIN_DIR, "steps": pre_info.get("steps"), "shared_as": "hard link or copy of "
                     f"{PRETRAIN_DIR}/{pre.rel(weights)}"},
        "runs": runs,
        "points": points,
        "ceiling_auc": ceiling,
        "evaluation": "run" if evaluate else eval_note,
        "timing": {**timing, "total_s": round(time.time() - t_all, 2)},  # total_s: this invocation
        "curve": CURVE_PNG,
        "note": ("each epsilon is its own release candidate (its own ledger); releasing several cohorts of this "
                 "sweep composes their epsilons"),
    }
    draw_curve(result, root / CURVE_PNG)
    write_json_atomic(root / SWEEP_JSON, to_jsonable(result))
    return result


_POINT_KEYS = ("tstr", "dp_sgd", "ft", "ceiling")


def aggregate_point(eps: float, points: list[dict]) -> dict:
    """One point of the curve from the fine-tunes of one epsilon: each figure's mean over them and
    its std over them (with one fine-tune: the classifier-seed std of that run)."""
    import numpy as np

    if len(points) == 1:
        return {**points[0], "repeats": 1}
    out: dict = {"epsilon": eps, "repeats": len(points), "fd_name": points[0].get("fd_name")}
    for key in [f"{k}_auc" for k in _POINT_KEYS] + ["fd", "fd_real", "spent_epsilon", "dp_sgd_epsilon"]:
        vals = [v for v in (_f(p.get(key)) for p in points) if v is not None]
        out[key] = float(np.mean(vals)) if vals else None
        if key.endswith("_auc") or key == "fd":
            std_key = key.replace("_auc", "_std") if key.endswith("_auc") else "fd_std"
            out[std_key] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return out


def _share_public_encoder(root: Path, eps_list: list[float], rd: RunDir) -> None:
    """Reuse the public feature encoder another epsilon's evaluation trained (public data only: free),
    so every point of the curve is measured with the same features. The evaluation re-checks its
    cache key (public data fingerprint, image shape, epochs, version) and retrains on a mismatch."""
    target = rd.public_encoder_file
    if target.exists():
        return
    for other in sorted(root.glob("eps_*")):
        src = RunDir(other).public_encoder_file
        if src.is_file() and src.resolve() != target.resolve():
            _link_or_copy(src, target)
            return


def _spent_epsilon(rd: RunDir, cfg: RunConfig) -> float | None:
    from dpgen.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger(rd.ledger_path)
    if not ledger.exists():
        return None
    try:
        return float(ledger.summary(cfg.privacy.delta).epsilon)
    except Exception:  # noqa: BLE001 - a summary problem must not lose the sweep
        return None


def _points(result: dict) -> list[dict]:
    pts = []
    for p in result.get("points") or []:
        q = dict(p)
        q["epsilon"] = _f(p.get("epsilon"))
        pts.append(q)
    return pts


def draw_curve(result: dict, path: str | Path) -> Path:
    from dpgen.report.figures import privacy_utility_curve
    from dpgen.rundir import atomic_path

    png = privacy_utility_curve(_points(result), _f(result.get("ceiling_auc")),
                                title=f"{result.get('config')}: privacy-utility sweep (δ = {result.get('delta')})")
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
    return Path(path)


def format_sweep(result: dict) -> str:
    def num(v, d=3):
        v = _f(v)
        return "-" if v is None else ("∞" if math.isinf(v) else f"{v:.{d}f}")

    def pm(p, key, d=3):
        std = _f(p.get(key.replace("_auc", "_std") if key.endswith("_auc") else f"{key}_std"))
        return num(p.get(key), d) + (f" ± {num(std, d)}" if std is not None else "")

    lines = [f"sweep: {result['sweep_dir']} (public pretraining once, {len(result['runs'])} fine-tunes)",
             f"  {'epsilon':>8} {'spent':>8} {'FD':>16} {'FD real':>10} {'TSTR AUC':>14} {'DP-SGD AUC':>14} "
             f"{'synth+DP AUC':>14}  runs"]
    for p in result["points"]:
        eps = _f(p.get("epsilon"))
        names = [r["run_dir"] for r in result["runs"] if _f(r["epsilon"]) == eps]
        lines.append(f"  {num(p.get('epsilon'), 2):>8} {num(p.get('spent_epsilon'), 3):>8} {pm(p, 'fd', 4):>16} "
                     f"{num(p.get('fd_real'), 4):>10} {pm(p, 'tstr_auc'):>14} {pm(p, 'dp_sgd_auc'):>14} "
                     f"{pm(p, 'ft_auc'):>14}  {', '.join(names)}")
    for r in result["runs"]:
        if not r.get("evaluated"):
            lines.append(f"  {r['run_dir']}: {r.get('note')}")
    lines.append(f"  non-private ceiling AUC: {num(result.get('ceiling_auc'))}; spread: {result.get('spread')}")
    lines.append(f"curve: {Path(result['sweep_dir']) / CURVE_PNG}; results: {Path(result['sweep_dir']) / SWEEP_JSON}")
    return "\n".join(lines)


__all__ = ["sweep", "parse_epsilons", "eps_dirname", "point_from_evaluation", "draw_curve", "format_sweep",
           "SWEEP_JSON", "CURVE_PNG"]
