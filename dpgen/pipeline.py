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
from dpgen.data import DataError, ImageDataset, load_dataset, resolve_source
from dpgen.privacy import mechanisms
from dpgen.privacy.ledger import PrivacyLedger
from dpgen.privacy.mechanisms import counts_from_histogram, split_total
from dpgen.privacy.schema import ArtifactEntry, PrivacySource
from dpgen.rundir import RunDir, default_run_dir, write_json_atomic
from dpgen.training.common import resolve_device

STAGES = ("pretrain", "finetune", "sample")


def check_sources(config: RunConfig) -> None:
    """Every data source resolves to a file before any work starts (errors name the key)."""
    for role in ("public", "private"):
        spec = getattr(config.data, role)
        if spec is None:
            continue
        try:
            resolve_source(spec.source)
        except DataError as err:
            raise ConfigError(f"config error: data.{role}.source = {spec.source!r}: {err}") from None


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
    _record(rd, "public", public)
    # The private data's *shape* (not its content) sizes the model.
    shape = private_image_shape(config)
    result = pretrain(config, rd, public, shape, resolve_device(device), progress)
    rd.mark_done("pretrain", result)
    return result


def finetune_stage(config: RunConfig, rd: RunDir, device="auto", progress: bool = True) -> dict:
    from dpgen.training.finetune import finetune

    if config.finetune.steps == 0:
        result = {"steps": 0, "note": "finetune.steps is 0: no private data used; sampling uses the pretrained model"}
        rd.mark_done("finetune", result)
        return result
    private = load_role(config, "private")
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
    from dpgen.privacy.randomness import step_generator

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
                 num_images: int | None = None, seed: int | None = None) -> dict:
    from dpgen.sampling import load

    s = config.sample
    n = num_images or s.num_images
    seed = s.seed if seed is None else seed
    counts, source = cohort_class_counts(config, rd, n)
    labels = np.concatenate([np.full(c, k) for k, c in counts.items()]).astype(np.int64)
    attributes, attr_source = cohort_attributes(config, len(labels), seed, rd)
    gen = load(rd.root, device=str(resolve_device(device)))
    result = gen.sample_cohort(
        rd.cohort, labels=labels, attributes=attributes, seed=seed, sampler=s.sampler, steps=s.steps,
        guidance_scale=s.guidance_scale, batch_size=s.batch_size, class_names=config.data.class_names,
        nifti=s.nifti, progress=progress,
    )
    result["class_counts_source"] = source
    result["attributes_source"] = attr_source
    ledger = PrivacyLedger(rd.ledger_path)
    entry = ArtifactEntry(name="cohort", path="cohort/cohort.npz",
                          privacy_source=cohort_privacy_source(config, gen.info.get("privacy_mechanisms") or []),
                          n=len(labels), class_counts=result["class_counts"], class_counts_source=source,
                          generator=gen.family, attributes_source=attr_source,
                          **({"nifti": "cohort/nifti"} if "nifti" in result else {}))
    ledger.append(entry)
    rd.mark_done("sample", {"n": result["n"], "class_counts": result["class_counts"]})
    return result


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
) -> dict:
    """pretrain -> finetune -> sample in one run directory. Returns a summary dict."""
    if not isinstance(config, RunConfig):
        config = load_config(config, overrides)
    check_sources(config)
    resolve_device(device)  # a device this machine lacks fails before the run directory exists
    rd = RunDir.create(run_dir or default_run_dir(config.name), config, resume=resume, overwrite=overwrite)
    summary: dict = {"run_dir": str(rd.root), "stages": {}}
    for name in stages:
        if resume and rd.is_done(name):
            summary["stages"][name] = {"skipped": "already done", **rd.state()["completed"][name]}
            continue
        t0 = time.time()
        result = STAGE_FUNCS[name](config, rd, device=device, progress=progress)
        result["seconds"] = round(time.time() - t0, 1)
        summary["stages"][name] = result
    ledger = PrivacyLedger(rd.ledger_path)
    summary["privacy"] = ledger.summary(config.privacy.delta).to_dict() if ledger.path.is_file() else None
    summary["target_epsilon"] = config.privacy.epsilon
    summary["generator"] = config.model.generator
    write_json_atomic(rd.root / "summary.json", summary)
    return summary


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
        lines.append(f"cohort: {s.get('n')} images, class counts {s.get('class_counts')} -> {summary['run_dir']}/cohort")
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

