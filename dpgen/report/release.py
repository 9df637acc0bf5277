"""`dpgen release RUN_DIR OUT`: the shareable bundle of a run, and nothing else.

What goes in (every file is written by this module; nothing is copied from the run directory
except through the allow-list):

    OUT/
      images/00000.png ...     the synthetic images (PNG for 2D, NIfTI .nii.gz for 3D)
      labels.csv               image, label, class_name (+ attribute columns); a dpgen folder source
      cohort.npz               the same cohort in MedMNIST layout (train_images, train_labels)
      dataset_card.md / .json  how it was made, the privacy guarantee (what it covers, for which
                               neighbouring relation and unit), uses, limits, the shareable checklist,
                               and what was left out (with the reason)
      weights/finetune.safetensors   only with --include-weights (DP weights; post-processing is free)
      SHA256SUMS               sha256sum-compatible, covering every other file in OUT

The bundle holds only DP outputs, post-processing of them, public data and user choices: no
evaluation or probe figure (they are computed on private data without DP and stay in the data
holder's internal review), and, under add/remove neighbours, nothing that states the number of
private units (dpgen.report.disclosure).

The allow-list is built from the ledger's typed "artifact" entries (dpgen.privacy.schema): an
artifact is releasable when its path is not under internal/ and its PrivacySource is public data
or a user choice, or names DP mechanisms that are all release-scope and finished with noise
(a completed DP-SGD run with sigma > 0 and a passed preflight, or a DP release with sigma > 0),
with the run's composed epsilon within its budget. No string is interpreted. The only source of
the synthetic images is the allow-listed cohort/cohort.npz. Every other file of the run directory
is listed in the card's "left out" section with its reason.

A federated coordinator's run directory (dpgen.federated) is released the same way: its cohort
names `dp_sgd:federated_finetune`, whose completion in the coordinator's ledger is the set of the
sites' reported completions (`LedgerSummary.federated`); the card states the guarantee per site,
and the sites' own run directories (DIR/sites/ in a demo) are one left-out entry, never read.

The release is refused (ReleaseError, nothing written) when the run is not finished, the preflight
failed or is missing, the composed epsilon exceeds the run's budget or is infinite, the plans
disagree on the budget, delta >= 1/N, the ledger cannot be read, or the ledger does not allow-list
the cohort. OUT must not exist or be empty, unless `overwrite`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

import numpy as np

from dpgen.core.files import sha256_file
from dpgen.core.naming import class_name
from dpgen.privacy.ledger import LedgerSummary
from dpgen.privacy.mechanisms import FEDERATED_FINETUNE, scope_of
from dpgen.privacy.schema import ArtifactEntry, PrivacySource
from dpgen.report.checklist import delta_check, epsilon_check, overall, preflight_check, shareable_checklist
from dpgen.report.runinfo import RunInfo, load_run

CHECKSUMS = "SHA256SUMS"
CARD_MD = "dataset_card.md"
CARD_JSON = "dataset_card.json"
NPZ_KEYS = ("train_images", "train_labels", "train_attributes", "attribute_names")


class ReleaseError(RuntimeError):
    """The run cannot be released (the message says why and what to do)."""


# ----------------------------------------------------------------------------- the allow-list


def source_problems(source: PrivacySource, summary: LedgerSummary) -> list[str]:
    """Why an artifact with this privacy source may not be released (empty: it may)."""
    if source.kind in ("public", "user"):
        return []
    problems = []
    releases = {r.name: r for r in summary.releases}
    for m in source.mechanisms:
        if scope_of(m) != "release":
            problems.append(f"{m} is an internal mechanism: its outputs never leave internal/")
            continue
        state = summary.mechanisms.get(m)
        if m == FEDERATED_FINETUNE:
            # complete = the federation finished and every contributing site's final state is
            # recorded; noisy and preflighted = what every contributing site reports
            if summary.federated is None:
                problems.append(f"{m} has no federation in the ledger (no fed_* entries)")
            else:
                problems.extend(summary.federated.completion_problems() + summary.federated.mechanism_problems())
        elif state is not None:
            if not state.complete:
                problems.append(f"{m} has not completed ({state.steps_done}/{state.planned_steps} steps)")
            if not state.sigma or state.sigma <= 0:
                problems.append(f"{m} ran without noise (sigma {state.sigma})")
            if state.preflight_passed is not True:
                problems.append(f"{m} has no passed per-sample-gradient preflight")
        elif m in releases:
            if releases[m].event.sigma <= 0:
                problems.append(f"{m} was released without noise")
        else:
            problems.append(f"{m} has no completed entry in the ledger")
    if summary.within_target is not True:
        problems.append(("not every contributing site is within its own budget" if summary.federated is not None
                         else "the run's composed epsilon is not within its budget")
                        + (f" ({summary.budget_problem})" if summary.budget_problem else ""))
    return problems


def _safe_relpath(path: str | None) -> str | None:
    if not path:
        return None
    p = PurePosixPath(str(path).replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts:
        return None
    return str(p)


def allow_list(info: RunInfo) -> tuple[dict[str, dict], list[dict]]:
    """({relpath: artifact} releasable, [{"path", "reason"}] refused), from the ledger's typed entries."""
    if info.privacy is None:
        return {}, [{"path": "privacy/ledger.jsonl", "reason": f"the ledger cannot be read: {info.privacy_note}"}]
    latest: dict[str, ArtifactEntry] = {a.name: a for a in info.privacy.artifacts}
    allowed, refused = {}, []
    for name, a in latest.items():
        rel = _safe_relpath(a.path)
        if rel is None:
            refused.append({"path": str(a.path), "reason": f"artifact {name!r}: path is absolute or leaves the run directory"})
            continue
        if PurePosixPath(rel).parts[0] == "internal":
            refused.append({"path": rel, "reason": f"artifact {name!r} is under internal/ (never released)"})
            continue
        why_not = source_problems(a.privacy_source, info.privacy)
        if why_not:
            refused.append({"path": rel, "reason": f"artifact {name!r} ({a.privacy_source.describe()}): "
                                                   + "; ".join(why_not)})
            continue
        if not (info.root / rel).exists():
            refused.append({"path": rel, "reason": f"artifact {name!r} is in the ledger but missing on disk"})
            continue
        allowed[rel] = {**a.model_dump(mode="json"), "release_reason": a.privacy_source.describe()}
    return allowed, refused


_LEFT_OUT_RULES = (
    ("internal/", "internal: derived from private data without DP (evaluation, probes, fine-tuning curves, the "
                  "internal review), or secrets; never released"),
    ("logs/", "public pretraining logs: not part of the dataset"),
    ("report/", "the shareable release review is shared on its own (dpgen report), not part of the dataset"),
    ("privacy/", "the full privacy ledger states the number of private units and the noise (data holder only); the "
                 "card states what may be shared"),
    ("checkpoints/", "model checkpoints are not part of the cohort bundle"),
    ("cohort/grid_", "preview grids are not allow-listed; the bundle's images are re-derived from cohort/cohort.npz"),
    ("manifest.json", "holds fingerprints (sha256) of the private data files"),
    ("summary.json", "run summary with losses on private data (not DP)"),
    ("state.json", "run bookkeeping"),
    ("config.yaml", "the run config may name private data locations; the card states the settings"),
    ("federation.yaml", "the federation config names the sites' data locations; the card states the public settings"),
)
#: A federated demo keeps each site's own run directory under the coordinator's (DIR/sites/NAME).
SITES_DIR = "sites"
SITES_REASON = ("the sites' own run directories (the demo keeps them under the coordinator's): each site's private "
                "data fingerprints, its ledger (its number of units, sample rate, noise), its secret seed and its "
                "updates. They belong to the sites, are never bundled, and the release reads nothing in them")
SITE_LOG_REASON = "a site process's output (demo): it belongs to that site; never bundled"


def _left_out_reason(rel: str, refused: dict[str, str], allowed: dict[str, dict]) -> str:
    if rel in refused:
        return refused[rel]
    if rel in allowed:
        if rel.startswith("checkpoints/"):
            return f"DP weights ({allowed[rel].get('privacy_source')}), not requested (--include-weights)"
        return f"allow-listed ({allowed[rel]['release_reason']}) but not part of the bundle layout"
    if rel.startswith("logs/demo_site_"):
        return SITE_LOG_REASON
    for prefix, reason in _LEFT_OUT_RULES:
        if rel.startswith(prefix):
            if prefix == "checkpoints/" and "_state" in rel:
                return "training state (optimizer moments, step counter): not allow-listed"
            return reason
    return "not in the ledger's allow-list of releasable artifacts"


def left_out(info: RunInfo, used: set[str], allowed: dict[str, dict], refused: list[dict],
             skip: tuple[Path, ...] = ()) -> list[dict]:
    """Every file of the run directory not used for the bundle, with the reason (`skip`: the bundle
    itself and its staging folder, when they lie inside the run directory)."""
    ref = {r["path"]: r["reason"] for r in refused}
    out, seen = [], set()
    skip = tuple(Path(p).resolve() for p in skip)
    paths = info.root.rglob("*")
    sites = info.root / SITES_DIR
    if info.federated and sites.is_dir():  # one entry for the folder: nothing inside is listed or read
        out.append({"path": f"{SITES_DIR}/", "reason": SITES_REASON})
        paths = (p for top in info.root.iterdir() if top != sites
                 for p in ([top] if not top.is_dir() or top.is_symlink() else [top, *top.rglob("*")]))
    for path in sorted(paths):
        if not path.is_file() and not path.is_symlink():
            continue
        rp = path.resolve()
        if any(rp == s or s in rp.parents for s in skip):
            continue
        rel = path.relative_to(info.root).as_posix()
        if rel in used:
            continue
        seen.add(rel)
        out.append({"path": rel, "reason": _left_out_reason(rel, ref, allowed)})
    for r in refused:  # refused artifacts that are not files (missing, absolute paths)
        if r["path"] not in seen and r["path"] not in used:
            out.append(dict(r))
    return out


def summarize_left_out(items: list[dict]) -> list[dict]:
    """What the card (which ships in the bundle) says was left out, in fixed words: each folder as
    one entry with its rule's reason, the known top-level files by name, anything else as one
    entry. No name inside a folder, no reason text that quotes one, no path outside the run
    directory: names are not all innocuous (TensorBoard files carry start times, host and pid, and
    the gap between two of them can time a pass over the private data; later cohorts are named by
    time). The full list goes to the data holder's console only."""
    rules = dict(_LEFT_OUT_RULES) | {f"{SITES_DIR}/": SITES_REASON}
    out: dict[str, str] = {}
    for it in items:
        path = it["path"]
        top, sep, _ = path.partition("/")
        if path.startswith("/") or top == "..":
            out.setdefault("(paths outside the run directory)", "ledger artifacts outside the run directory: refused")
        elif sep:
            out.setdefault(top + "/", rules.get(top + "/", "files not in the ledger's allow-list of releasable "
                                                           "artifacts"))
        elif path in rules:
            out.setdefault(path, rules[path])
        else:
            out.setdefault("(other top-level files)", "not in the ledger's allow-list of releasable artifacts")
    return [{"path": p, "reason": r} for p, r in sorted(out.items())]


# ----------------------------------------------------------------------------- refusals


def release_problems(info: RunInfo) -> list[str]:
    """Why this run cannot be released (empty: it can). Decided on the ledger alone: never on
    the evaluation or the probes (a release gated on private, non-DP statistics would leak them)."""
    problems = []
    if info.config is None:
        problems.append(f"the run's config cannot be read ({info.config_note})")
    problems.extend(f"the run is not finished: {p}" for p in info.unfinished())
    for check in (preflight_check(info), epsilon_check(info), delta_check(info)):
        if check["status"] == "fail":
            problems.append(f"{check['id']} check failed: {check['reason']}")
    for name, plan in info.plans.items():
        # Under add/remove the sample rate must come from a public unit count: q = batch / N
        # makes the mechanism itself depend on N (runs planned before privacy.public_unit_count).
        if (plan.scope == "release" and plan.neighbouring == "add_remove" and plan.sigma > 0
                and (plan.public_unit_count is None
                     or abs(plan.sample_rate - plan.expected_batch_size / plan.public_unit_count) > 1e-12)):
            problems.append(f"{name}: its sample rate was not computed from a public unit count, so under add/remove "
                            f"the mechanism depended on N; rerun with privacy.public_unit_count set")
    return problems


# ----------------------------------------------------------------------------- writing


def write_checksums(out: Path) -> Path:
    """SHA256SUMS over every file in `out` (but itself), sorted, in `sha256sum -c` format."""
    out = Path(out)
    lines = []
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != CHECKSUMS:
            rel = p.relative_to(out).as_posix()
            if "\n" in rel or "\\" in rel:
                raise ReleaseError(f"{rel!r}: file names with newlines or backslashes cannot be listed in {CHECKSUMS}")
            lines.append(f"{sha256_file(p)}  {rel}\n")
    target = out / CHECKSUMS
    target.write_text("".join(lines))
    return target


def verify_bundle(out: str | Path) -> list[str]:
    """Problems with a bundle's checksums (empty list: every file is listed and matches)."""
    out = Path(out)
    sums = out / CHECKSUMS
    if not sums.is_file():
        return [f"{sums}: missing"]
    problems, listed = [], set()
    for n, line in enumerate(sums.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64:
            problems.append(f"{CHECKSUMS} line {n}: not '<sha256>  <path>'")
            continue
        listed.add(rel)
        p = out / rel
        if _safe_relpath(rel) is None:
            problems.append(f"{rel}: path leaves the bundle")
        elif not p.is_file():
            problems.append(f"{rel}: listed but missing")
        elif sha256_file(p) != digest:
            problems.append(f"{rel}: checksum mismatch (modified after release)")
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != CHECKSUMS and p.relative_to(out).as_posix() not in listed:
            problems.append(f"{p.relative_to(out).as_posix()}: not covered by {CHECKSUMS}")
    return problems


def write_shareable_weights(src: Path, dst: Path, disclose_n: bool) -> None:
    """The DP weights with the metadata that may be shared: the family and the spec that rebuild
    the network (user choices) and which mechanisms trained it. The run's checkpoint also records
    the completion entry (sigma, sample rate, exact epsilon: functions of N) and the preflight;
    under add/remove neighbours those stay in the run directory."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata() or {})
    info = json.loads(meta.get("info", "{}"))
    keep = ("stage", "privacy_mechanisms", "trainable", "autoencoder", "generator_privacy")
    shared = {k: info[k] for k in keep if k in info}
    if disclose_n:
        shared["privacy"] = info.get("privacy")
    save_file(load_file(str(src)), str(dst), metadata={"family": meta.get("family", "diffusion"),
                                                       "spec": meta.get("spec", "{}"), "info": json.dumps(shared)})


def read_cohort(path: Path) -> dict[str, np.ndarray]:
    """The cohort's arrays (known keys only; never unpickles)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in NPZ_KEYS if k in z.files}
    except Exception as err:  # noqa: BLE001
        raise ReleaseError(f"{path}: cannot read the cohort ({type(err).__name__}: {err})") from None
    if "train_images" not in arrays or "train_labels" not in arrays:
        raise ReleaseError(f"{path}: not a MedMNIST-layout cohort (needs train_images and train_labels)")
    if len(arrays["train_images"]) != len(arrays["train_labels"]):
        raise ReleaseError(f"{path}: {len(arrays['train_images'])} images but {len(arrays['train_labels'])} labels")
    return arrays


def is_volume(images: np.ndarray) -> bool:
    """MedMNIST layout: (N,H,W) grey and (N,H,W,3) RGB are 2D; (N,D,H,W) is 3D."""
    return images.ndim == 4 and images.shape[-1] not in (3, 4) or images.ndim == 5


def _write_images(folder: Path, images: np.ndarray, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if is_volume(images):
        from dpgen.data.medmnist import medmnist_to_channel_first
        from dpgen.data.nifti import write_nifti

        # dpgen.data.nifti's convention: the cohort's axes are the NIfTI voxel axes, in order, so the
        # bundle read back as a folder source gives the cohort's volumes unchanged
        for img, name in zip(images, names):
            write_nifti(folder / name, medmnist_to_channel_first(img[None], name)[0])
    else:
        from PIL import Image

        for img, name in zip(images, names):
            Image.fromarray(img if img.ndim == 2 or img.shape[-1] != 1 else img[..., 0]).save(folder / name, format="PNG")


def write_cohort_files(out: Path, arrays: dict[str, np.ndarray], class_names: list[str] | None) -> dict:
    images, labels = arrays["train_images"], np.asarray(arrays["train_labels"]).reshape(len(arrays["train_images"]), -1)[:, 0]
    volume = is_volume(images)
    ext = ".nii.gz" if volume else ".png"
    width = max(5, len(str(len(images))))
    names = [f"{i:0{width}d}{ext}" for i in range(len(images))]
    _write_images(out / "images", images, names)
    attrs = arrays.get("train_attributes")
    attr_names = [str(a) for a in arrays.get("attribute_names", [])] if attrs is not None else []
    if attrs is not None and len(attr_names) != attrs.shape[1]:
        attr_names = [f"attribute_{j}" for j in range(attrs.shape[1])]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "label", "class_name", *attr_names])
    for i, (name, lab) in enumerate(zip(names, labels)):
        w.writerow([f"images/{name}", int(lab), class_name(int(lab), class_names),
                    *([f"{float(x):.6g}" for x in attrs[i]] if attrs is not None else [])])
    (out / "labels.csv").write_text(buf.getvalue())
    with open(out / "cohort.npz", "wb") as f:
        np.savez_compressed(f, **arrays)
    counts = {class_name(int(k), class_names): int((labels == k).sum()) for k in np.unique(labels)}
    return {"n": int(len(images)), "image_shape": list(images.shape[1:]), "dims": "3D" if volume else "2D",
            "image_format": "NIfTI (.nii.gz)" if volume else "PNG", "class_counts": counts,
            "attributes": attr_names}


def _check_out(out: Path, run_root: Path, overwrite: bool) -> None:
    out_r, run_r = out.resolve(), run_root.resolve()
    if out_r == run_r or out_r in run_r.parents:
        raise ReleaseError(f"OUT {out} is the run directory or contains it; choose another folder")
    if run_r in out_r.parents:
        raise ReleaseError(f"OUT {out} is inside the run directory; choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise ReleaseError(f"OUT {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ReleaseError(f"OUT {out} exists and is not empty; choose a new folder or pass --overwrite")
        if not (out / CHECKSUMS).is_file() or not (out / CARD_JSON).is_file():
            raise ReleaseError(f"--overwrite: {out} is not a bundle dpgen wrote (no {CHECKSUMS} and {CARD_JSON}); "
                               f"remove it yourself if you mean it")


def release(run_dir: str | Path, out: str | Path, *, overwrite: bool = False, include_weights: bool = False) -> dict:
    """Write the bundle; return {"out", "files", "left_out", "checklist", "card"}. Raises ReleaseError."""
    from dpgen.report.card import build_card, card_markdown

    info = load_run(run_dir)
    out = Path(out)
    _check_out(out, info.root, overwrite)
    items = shareable_checklist(info)
    problems = release_problems(info)
    allowed, refused = allow_list(info)
    cohort_rel = info.rd.cohort_file.relative_to(info.root).as_posix()
    if cohort_rel not in allowed and not problems:
        why = next((r["reason"] for r in refused if r["path"] == cohort_rel), "no 'artifact' entry for it")
        problems.append(f"the ledger does not allow-list {cohort_rel}: {why}")
    if problems:
        raise ReleaseError("refusing to release " + str(info.root) + ":\n  - " + "\n  - ".join(problems))
    used = {cohort_rel}
    weights_rel = "checkpoints/finetune.safetensors"
    if include_weights:
        if weights_rel not in allowed:
            raise ReleaseError(f"--include-weights: the ledger does not allow-list {weights_rel}")
        used.add(weights_rel)

    arrays = read_cohort(info.root / cohort_rel)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # same filesystem: the final move is a rename
    try:
        cohort = write_cohort_files(stage, arrays, getattr(info.config.data, "class_names", None))
        files = {"images": f"images/ ({cohort['n']} {cohort['image_format']} files)", "labels": "labels.csv",
                 "npz": "cohort.npz", "card": [CARD_MD, CARD_JSON], "checksums": CHECKSUMS}
        if include_weights:
            (stage / "weights").mkdir()
            write_shareable_weights(info.root / weights_rel, stage / "weights" / "finetune.safetensors",
                                    disclose_n=info.neighbouring == "replace_one")
            files["weights"] = "weights/finetune.safetensors"
        gone = left_out(info, used, allowed, refused, skip=(out, stage))
        card = build_card(info, items, cohort, files, gone, allowed, include_weights=include_weights)
        (stage / CARD_JSON).write_text(json.dumps(card, indent=2, ensure_ascii=False, default=str) + "\n")
        (stage / CARD_MD).write_text(card_markdown(card))
        write_checksums(stage)
        for p in [stage, *stage.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out) if any(out.iterdir()) else out.rmdir()
        os.replace(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    bad = verify_bundle(out)
    if bad:  # pragma: no cover - would be a bug in this module
        raise ReleaseError("the written bundle does not verify: " + "; ".join(bad))
    return {"out": str(out), "files": sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()),
            "left_out": gone, "checklist": items, "overall": overall(items), "card": card}


def format_release(result: dict) -> str:
    lines = [f"release bundle: {result['out']} ({len(result['files'])} files, checksums in {CHECKSUMS})"]
    card = result["card"]
    p = card["privacy"]
    lines.append(f"privacy: {p['meaning']}")
    for it in result["checklist"]:
        lines.append(f"  [{it['status'].upper():4}] {it['title']}: {it['reason']}")
    lines.append(f"left out ({len(result['left_out'])} files of the run directory; reasons in {CARD_MD}):")
    for it in summarize_left_out(result["left_out"]):
        lines.append(f"  - {it['path']}: {it['reason']}")
    return "\n".join(lines)


__all__ = ["ReleaseError", "release", "verify_bundle", "write_checksums", "allow_list", "source_problems",
           "release_problems", "format_release", "CHECKSUMS", "CARD_MD", "CARD_JSON"]
