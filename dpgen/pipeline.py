"""The stages and the chain that runs them.

Each stage is a plain function `stage(config, run_dir, ...) -> dict` that reads and writes one
run directory. The CLI, the launch scripts in train/ and the Python API call these functions.
A finished stage is recorded in state.json, so `run(..., resume=True)` skips it; an
interrupted stage picks up from its last checkpoint.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from dpgen.config import ConfigError, RunConfig, load_config
from dpgen.core.device import resolve_device
from dpgen.data import DataError, ImageDataset, check_labels, check_spatial_dims, load_dataset, resolve_source
from dpgen.data.transform import fit_to_shape
from dpgen.privacy import mechanisms
from dpgen.privacy.ledger import PrivacyLedger
from dpgen.privacy.mechanisms import counts_from_histogram, split_total
from dpgen.privacy.schema import ArtifactEntry, PrivacySource
from dpgen.rundir import COHORT_NPZ, RunDir, default_run_dir, write_json_atomic

STAGES = ("pretrain", "finetune", "sample")


def check_sources(config: RunConfig) -> None:
    """Every data source resolves to a file before any work starts, and .npz sources are readable
    and of the config's dimensionality (errors name the key): `dpgen.data.check_sources`."""
    from dpgen.data import check_sources as check_data_sources

    check_data_sources(config.data)


def read_paths(config: RunConfig, config_path: str | Path | None = None) -> list[Path]:
    """The files a run reads (its config file, its data sources): `--overwrite` never deletes them."""
    paths = [Path(config_path)] if config_path is not None else []
    for role in ("public", "private"):
        spec = getattr(config.data, role)
        if spec is not None:
            try:
                paths.append(resolve_source(spec.source, download=False))
            except DataError:
                pass
    return paths


def load_role(config: RunConfig, role: str, split: str | None = None) -> ImageDataset | None:
    """The dataset of a role; folder sources read the conditioning attribute columns."""
    spec = getattr(config.data, role)
    if spec is None:
        return None
    updates: dict = {}
    names = list(config.data.attributes)
    if names and not spec.attribute_columns:
        path = resolve_source(spec.source)
        if not (path.is_file() and path.suffix == ".npz"):
            updates["attribute_columns"] = names
        elif role == "private":
            raise DataError(
                f"{path}: data.attributes names {names}, but a .npz source carries no attribute columns; "
                f"use a folder with a labels CSV"
            )
    return load_dataset(spec.model_copy(update=updates) if updates else spec, split=split)


def _record(rd: RunDir, role: str, ds: ImageDataset | None) -> None:
    if ds is not None:
        rd.record_datasets({f"{role}/{ds.split}": ds.info()})


def private_image_shape(config: RunConfig) -> tuple[int, ...]:
    return load_role(config, "private").image_shape


# ----------------------------------------------------------------------------- stages


def pretrain_stage(config: RunConfig, rd: RunDir, device="auto", progress: bool = True) -> dict:
    from dpgen.training.pretrain import pretrain

    public = load_role(config, "public")
    # The private data's *shape* (not its content) sizes the model.
    private = load_role(config, "private")
    shape = private.image_shape
    for role, ds in (("public", public), ("private", private)):
        if ds is not None:
            check_spatial_dims(config.data, role, ds.image_shape)  # folder sources are first read here
    check_labels(config.data, private.labels)
    if public is not None:  # data.public.transform: fitted to the private shape (recorded in the manifest)
        public = fit_to_shape(public, shape, config.data.public.transform)
    _record(rd, "public", public)
    result = pretrain(config, rd, public, shape, resolve_device(device), progress)
    rd.mark_done("pretrain", result)
    return result


def finetune_stage(config: RunConfig, rd: RunDir, device="auto", progress: bool = True) -> dict:
    from dpgen.training.finetune import finetune

    if not rd.is_done("pretrain"):
        from dpgen.rundir import RunDirError

        raise RunDirError(f"{rd.root}: its pretraining has not finished, so there is nothing to fine-tune yet; finish it "
                          f"first: dpgen pretrain {rd.config_path} --run-dir {rd.root} --resume")
    if config.finetune.steps == 0:
        result = {"steps": 0, "note": "finetune.steps is 0: no private data used; sampling uses the pretrained model"}
        rd.mark_done("finetune", result)
        return result
    private = load_role(config, "private")
    check_labels(config.data, private.labels)
    _record(rd, "private", private)
    result = finetune(config, rd, private, resolve_device(device), progress)
    rd.mark_done("finetune", result)
    return result


def cohort_class_counts(config: RunConfig, rd: RunDir, n: int) -> tuple[dict[int, int], str]:
    """How many images of each class to sample, and where that choice comes from."""
    cc, k = config.sample.class_counts, config.data.num_classes
    if cc.mode == "uniform":
        return split_total(np.full(k, 1 / k), n), "uniform (public: uses no data)"
    if cc.mode == "fixed":
        counts = {c: int(cc.counts.get(c, 0)) for c in range(k)}
        if sum(counts.values()) != n:
            raise ConfigError(
                f"config error: sample.class_counts.counts = {cc.counts}: sums to {sum(counts.values())}, "
                f"but sample.num_images = {n}"
            )
        return counts, "fixed by the user"
    release = PrivacyLedger(rd.ledger_path).latest("dp_release", name=mechanisms.LABEL_HISTOGRAM)
    if release is None:
        raise ConfigError(
            "sample.class_counts.mode = 'dp_histogram' but the ledger holds no DP label histogram "
            "(it is released by the finetune stage)"
        )
    return counts_from_histogram(np.asarray(release["values"]), n), "DP label histogram (Gaussian mechanism, in the ledger)"


def cohort_attributes(config: RunConfig, n: int, seed: int, rd: RunDir | None = None) -> tuple[dict | None, str]:
    """The attributes the cohort is generated with, and where they come from (never the
    private table: user values, the fixed ranges, the public dataset, or DP histograms)."""
    from dpgen.core.seeding import step_generator

    a = config.sample.attributes
    names = list(config.data.attributes)
    if a.mode == "none":
        return None, "none (attributes unspecified)"
    if a.mode == "fixed":
        return {k: a.values[k] for k in names}, "fixed by the user"
    g = step_generator(seed, 0, "attributes")
    if a.mode == "uniform":
        u = torch.rand((n, len(names)), generator=g, dtype=torch.float64).numpy()
        return ({k: (r.min + u[:, j] * (r.max - r.min)).tolist() for j, (k, r) in enumerate(config.data.attributes.items())},
                "uniform over the configured ranges (public: uses no data)")
    if a.mode == "dp_histogram":
        release = PrivacyLedger(rd.ledger_path).latest("dp_release", name=mechanisms.ATTRIBUTE_HISTOGRAM) if rd else None
        if release is None:
            raise ConfigError(
                "sample.attributes.mode = 'dp_histogram' but the ledger holds no DP attribute histogram "
                "(it is released by the finetune stage)"
            )
        out = {}
        for j, k in enumerate(release["attributes"]):
            h = np.clip(np.asarray(release["values"][j], dtype=float), 0, None)
            p = torch.as_tensor(h / h.sum() if h.sum() > 0 else np.full(len(h), 1 / len(h)))
            b = torch.multinomial(p, n, replacement=True, generator=g).numpy()
            u = torch.rand(n, generator=g, dtype=torch.float64).numpy()
            lo, hi = release["ranges"][j]
            out[k] = (lo + (b + u) / len(h) * (hi - lo)).tolist()
        return out, "DP attribute histograms (Gaussian mechanism, in the ledger; marginals drawn independently)"
    public = load_role(config, "public")
    if public is None or public.attributes is None or any(k not in public.attribute_names for k in names):
        raise ConfigError(
            f"config error: sample.attributes.mode = 'public' needs public data with the attribute columns "
            f"{names} (data.public, a folder with a labels CSV)"
        )
    cols = [public.attribute_names.index(k) for k in names]
    rows = torch.randint(0, len(public), (n,), generator=g).numpy()
    vals = np.asarray(public.attributes)[rows][:, cols]
    lo = np.array([config.data.attributes[k].min for k in names])
    hi = np.array([config.data.attributes[k].max for k in names])
    vals = np.clip(vals, lo, hi)  # the model was trained on the fixed ranges
    return {k: vals[:, j].tolist() for j, k in enumerate(names)}, f"public data ({public.name}, rows drawn with replacement)"


def sample_stage(config: RunConfig, rd: RunDir, device="auto", progress: bool = True,
                 num_images: int | None = None, seed: int | None = None, name: str | None = None,
                 overwrite: bool = False) -> dict:
    """Sample the run's cohort into cohort/ (cohort/cohort.npz, what evaluate, audit and release
    use). Once the run has its cohort, sampling again writes a new cohort beside it, in
    cohort/NAME/ (default NAME: a time stamp), and never replaces the run's cohort unless
    `overwrite` (without `name`). Every cohort is its own artifact in the ledger."""
    s = config.sample
    n = s.num_images if num_images is None else int(num_images)
    if n <= 0:
        raise ConfigError(f"--num-images {n}: the cohort needs at least one image")
    seed = s.seed if seed is None else seed
    folder, rel, artifact = cohort_target(rd, name, overwrite)
    fresh = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)  # a read-only run fails here, before any work
    try:
        from dpgen.sampling import load

        gen = load(rd.root, device=str(resolve_device(device)))  # before the counts: its error names the missing stage
        counts, source = cohort_class_counts(config, rd, n)
        labels = np.concatenate([np.full(c, k) for k, c in counts.items()]).astype(np.int64)
        attributes, attr_source = cohort_attributes(config, len(labels), seed, rd)
        result = gen.sample_cohort(
            folder, labels=labels, attributes=attributes, seed=seed, sampler=s.sampler, steps=s.steps,
            guidance_scale=s.guidance_scale, batch_size=s.batch_size, class_names=config.data.class_names,
            nifti=s.nifti, progress=progress,
        )
    except BaseException:
        if fresh:  # a cohort folder this call made: leave nothing half-written
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
        raise
    result["class_counts_source"] = source
    result["attributes_source"] = attr_source
    result["cohort"] = str(folder)
    ledger = PrivacyLedger(rd.ledger_path)
    entry = ArtifactEntry(name=artifact, path=rel,
                          privacy_source=cohort_privacy_source(config, gen.info.get("privacy_mechanisms") or []),
                          n=len(labels), class_counts=result["class_counts"], class_counts_source=source,
                          generator=gen.family, attributes_source=attr_source,
                          **({"nifti": str(Path(rel).parent / "nifti")} if "nifti" in result else {}))
    ledger.append(entry)
    if artifact == "cohort":
        rd.mark_done("sample", {"n": result["n"], "class_counts": result["class_counts"]})
    return result


def cohort_target(rd: RunDir, name: str | None, overwrite: bool) -> tuple[Path, str, str]:
    """(folder, path in the run directory, ledger artifact name) of the cohort to write."""
    from datetime import datetime

    from dpgen.rundir import RunDirError

    if name is None and (overwrite or not rd.is_done("sample")):
        return rd.cohort, rd.rel(rd.cohort_file), "cohort"
    if name is None:
        base = datetime.now().strftime("%Y%m%d-%H%M%S")
        name, i = base, 2
        while (rd.cohort / name).exists():
            name, i = f"{base}-{i}", i + 1
    elif not name or name != Path(name).name or name.startswith(".") or name in ("nifti", COHORT_NPZ) \
            or not all(ch.isalnum() or ch in "-_." for ch in name):
        raise ConfigError(f"--name {name!r}: use letters, digits, '-', '_' and '.' (a folder name inside cohort/)")
    folder = rd.cohort / name
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise RunDirError(f"cohort {folder} already exists; choose another --name, or pass --overwrite to replace it")
    return folder, rd.rel(folder / COHORT_NPZ), f"cohort/{name}"


def cohort_privacy_source(config: RunConfig, weight_mechanisms: list[str]) -> PrivacySource:
    """The cohort is computed from the generator's weights, the class counts and the
    attributes, and public randomness: post-processing of the mechanisms behind them."""
    used = list(weight_mechanisms)
    if config.sample.class_counts.mode == "dp_histogram":
        used.append(mechanisms.LABEL_HISTOGRAM)
    if config.sample.attributes.mode == "dp_histogram":
        used.append(mechanisms.ATTRIBUTE_HISTOGRAM)
    if not used:
        public = config.sample.attributes.mode == "public" or config.data.public is not None
        return PrivacySource(kind="public" if public else "user",
                             note="no fine-tuning: the generator saw public data only")
    return PrivacySource(kind="post_processing", mechanisms=tuple(dict.fromkeys(used)))


STAGE_FUNCS = {"pretrain": pretrain_stage, "finetune": finetune_stage, "sample": sample_stage}


# ----------------------------------------------------------------------------- the chain


def run(
    config: RunConfig | str | Path,
    run_dir: str | Path | None = None,
    *,
    overrides: list[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    progress: bool = True,
    stages: tuple[str, ...] = STAGES,
    log=None,
) -> dict:
    """pretrain -> finetune -> sample in one run directory. Returns a summary dict.

    `log`: called with one line when the run directory is open (the CLI prints it). A run that
    fails before anything was computed (a data error, say) leaves no run directory behind."""
    config_path = None
    if not isinstance(config, RunConfig):
        config_path = config
        config = load_config(config, overrides)
    check_sources(config)
    resolve_device(device)  # a device this machine lacks fails before the run directory exists
    root = Path(run_dir or default_run_dir(config.name))
    was_empty = root.is_dir() and not any(root.iterdir())
    rd = RunDir.create(root, config, resume=resume, overwrite=overwrite, protect=read_paths(config, config_path))
    if log is not None:
        log(f"run directory: {rd.root}" + (" (resumed)" if resume else ""))
    summary: dict = {"run_dir": str(rd.root), "stages": {}}
    try:
        for name in stages:
            if resume and rd.is_done(name):
                summary["stages"][name] = {"skipped": "already done", **rd.state()["completed"][name]}
                continue
            t0 = time.time()
            result = STAGE_FUNCS[name](config, rd, device=device, progress=progress)
            result["seconds"] = round(time.time() - t0, 1)
            summary["stages"][name] = result
    except BaseException:
        if not resume and not rd.has_progress():
            _remove_new_run(rd.root, was_empty)
        raise
    ledger = PrivacyLedger(rd.ledger_path)
    summary["privacy"] = ledger.summary(config.privacy.delta).to_dict() if ledger.path.is_file() else None
    summary["target_epsilon"] = config.privacy.epsilon
    summary["generator"] = config.model.generator
    write_json_atomic(rd.summary_path, summary)
    return summary


def _remove_new_run(root: Path, was_empty: bool) -> None:
    """Remove what this call wrote into a run directory it started (nothing computed yet): the
    directory itself, or its contents when it was an empty directory before."""
    import shutil

    if not was_empty:
        shutil.rmtree(root, ignore_errors=True)
        return
    for p in root.iterdir():
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def format_summary(summary: dict) -> str:
    lines = [f"run directory: {summary['run_dir']}"]
    st = summary["stages"]
    if "pretrain" in st:
        p = st["pretrain"]
        ae = f"; autoencoder {p['autoencoder_steps']} steps, latents {p.get('latent_shape')}" if "autoencoder_steps" in p else ""
        lines.append(f"pretrain: {p.get('steps')} steps on public data{ae} ({p.get('seconds', '-')} s)")
    if "finetune" in st:
        f = st["finetune"]
        if f.get("sigma") is not None:
            eps = f.get("epsilon")
            eps_s = "inf" if eps is None or math.isinf(eps) else f"{eps:.3f}"
            lines.append(
                f"finetune: {f['steps']} DP-SGD steps, sigma {f['sigma']:.3f}, sample rate {f['sample_rate']:.4f}, "
                f"{f['unit']}; epsilon {eps_s} at delta {f['delta']:g} ({f.get('seconds', '-')} s)"
            )
        else:
            lines.append(f"finetune: {f.get('note') or f.get('skipped')}")
    if "sample" in st:
        s = st["sample"]
        where = s.get("cohort") or f"{summary['run_dir']}/cohort"
        lines.append(f"cohort: {s.get('n')} images, class counts {s.get('class_counts')} -> {where}")
    priv = summary.get("privacy")
    if priv and priv.get("epsilon") is not None:
        rdp = priv.get("epsilon_rdp")
        rdp_s = f"; RDP {rdp:.3f}" if isinstance(rdp, float) else ""
        lines.append(
            f"privacy: epsilon {priv['epsilon']:.3f} (PLD{rdp_s}) at delta {priv['delta']:g} for "
            f"{priv['neighbouring'].replace('_', '/')} neighbours, {priv.get('unit')}, budget {priv.get('target_epsilon')}: "
            f"{'within budget' if priv.get('within_target') else 'NOT within budget'}; ledger {priv.get('ledger')}"
        )
    return "\n".join(lines)


def open_run(run_dir: str | Path) -> tuple[RunConfig, RunDir]:
    rd = RunDir(Path(run_dir))
    return rd.load_config(), rd

