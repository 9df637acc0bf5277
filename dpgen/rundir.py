"""The run directory: the unit users move around.

    RUN/
      config.yaml           the resolved config (round-trips through `load_config`)
      manifest.json         versions, git commit, seeds, dataset fingerprints (never data)
      state.json            which stages finished
      checkpoints/          safetensors weights (their metadata holds the family and the spec that
                            rebuild the network) and resumable training states
      privacy/ledger.jsonl  the append-only privacy ledger
      logs/                 TensorBoard event files
      cohort/               the synthetic cohort (.npz in MedMNIST layout, PNG grids; NIfTI for 3D)
      evaluation/           the public feature encoder `dpgen evaluate` trains (public data only)
      report/report.html    the shareable release review (DP outputs, public data, user choices only)
      internal/             anything that shows or derives from private data without DP, and
                            secrets; never released: secrets.json (0600), logs/ (fine-tuning
                            curves), sampling/ (per-step sampled counts), evaluation/, audit/,
                            review/review.html (the data holder's internal review)

Every file is written atomically (write to a temporary file, then rename), so a crash leaves
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

# torch, safetensors and dpgen.distributed (torch) are imported where they are used: the CLI
# checks a run directory (and refuses a bad one) before loading the heavy stacks.

COHORT_NPZ = "cohort.npz"  # in cohort/ and in each cohort/NAME/ folder

DEPENDENCIES = (
    "torch", "opacus", "monai", "diffusers", "torchmetrics", "accelerate", "dp-accounting",
    "safetensors", "numpy", "scipy", "pydantic",
)


_UMASK = os.umask(0)
os.umask(_UMASK)


class RunDirError(RuntimeError):
    pass


@contextmanager
def atomic_path(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`.

    The file gets the usual permissions (0666 minus the umask), or `mode` (e.g. 0o600 for
    secrets: the temporary file is created 0600, so it is never readable by others)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:  # name the file the user knows, not the temporary one
        raise OSError(err.errno, err.strerror, str(path)) from None
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK if mode is None else mode)  # mkstemp makes 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | Path, text: str, mode: int | None = None) -> None:
    from dpgen.distributed import is_writer

    if not is_writer():  # distributed fine-tuning: rank 0 writes the run directory
        return
    with atomic_path(path, mode) as tmp:
        tmp.write_text(text)


def to_jsonable(obj: Any) -> Any:
    """Strict JSON values: inf/nan as strings, numpy and torch values as Python, paths as str."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")
    torch = sys.modules.get("torch")  # not imported: obj cannot be a tensor
    if isinstance(obj, np.ndarray) or (torch is not None and isinstance(obj, torch.Tensor)):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json_atomic(path: str | Path, obj: Any, mode: int | None = None) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", mode)


def save_tensors_atomic(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    from dpgen.distributed import is_writer

    if not is_writer():  # distributed fine-tuning: rank 0 writes the run directory
        return
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """safetensors only: loading weights never unpickles."""
    from safetensors.torch import load_file

    return load_file(str(path))


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("dpgen", *DEPENDENCIES):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    # --- layout
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def pretrain_weights(self) -> Path:
        """The public pretrained generator (safetensors + spec)."""
        return self.checkpoints / "pretrain.safetensors"

    @property
    def finetune_weights(self) -> Path:
        """The DP fine-tuned generator: what `dpgen.load` and the sample stage use."""
        return self.checkpoints / "finetune.safetensors"

    @property
    def pretrain_state(self) -> Path:
        """Resumable state of the public pretraining (model, EMA, optimizer, step)."""
        return self.checkpoints / "pretrain_state.safetensors"

    @property
    def finetune_state(self) -> Path:
        """Resumable state of the DP fine-tuning."""
        return self.checkpoints / "finetune_state.safetensors"

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.json"

    @property
    def ledger_path(self) -> Path:
        return self.root / "privacy" / "ledger.jsonl"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def cohort(self) -> Path:
        return self.root / "cohort"

    @property
    def internal(self) -> Path:
        return self.root / "internal"

    @property
    def public_encoder_file(self) -> Path:
        """The feature encoder `dpgen evaluate` trains on the public data (no private data: not internal)."""
        return self.root / "evaluation" / "public_encoder.safetensors"

    # Outputs of the evaluate and audit stages: statistics of private data computed without
    # DP, so they live under internal/ (the data holder's internal review reads them).
    @property
    def evaluation_dir(self) -> Path:
        return self.internal / "evaluation"

    @property
    def evaluation_file(self) -> Path:
        return self.evaluation_dir / "evaluation.json"

    @property
    def audit_dir(self) -> Path:
        return self.internal / "audit"

    @property
    def probes_file(self) -> Path:
        """Every probe result, per record."""
        return self.audit_dir / "probes.json"

    @property
    def probes_summary_file(self) -> Path:
        """The probes' aggregates (still internal: computed on private data without DP)."""
        return self.audit_dir / "probes_summary.json"

    @property
    def review_html(self) -> Path:
        """The internal release review (evaluation, probes, ledger): never shared."""
        return self.internal / "review" / "review.html"

    @property
    def report_html(self) -> Path:
        """The shareable release review."""
        return self.root / "report" / "report.html"

    @property
    def cohort_file(self) -> Path:
        """The run's cohort (what evaluate, audit, report and release use)."""
        return self.cohort / COHORT_NPZ

    def rel(self, path: str | Path) -> str:
        """`path` relative to the run directory, with forward slashes (ledger and report paths)."""
        return Path(path).relative_to(self.root).as_posix()

    # --- lifecycle
    @classmethod
    def open(cls, root: str | Path) -> "RunDir":
        """An existing run directory, or a RunDirError that says what `root` is. Reads the file
        system only: commands call it before loading torch, so a wrong path answers at once."""
        root = Path(root)
        if not root.exists():
            raise RunDirError(f"{root}: no such run directory")
        if not root.is_dir():
            raise RunDirError(f"{root} is a file, not a run directory")
        if not is_run_dir(root):
            raise RunDirError(f"{root} is not a dpgen run directory (no config.yaml and state.json / manifest.json "
                              f"written by dpgen); start one with `dpgen run CONFIG` or `dpgen pretrain CONFIG`")
        return cls(root)

    @classmethod
    def create(cls, root: str | Path, config, *, resume: bool = False, overwrite: bool = False,
               protect: Iterable[str | Path] = ()) -> "RunDir":
        """Open a run directory for writing.

        An existing, non-empty directory is refused unless the user asked to `resume` it
        (same config required, unless nothing was computed in it yet) or to `overwrite` it
        (removed first; only a run directory dpgen made, see `check_run_dir`). `protect`:
        paths the run reads (config, data) that an overwrite must never delete.
        """
        rd = cls(Path(root))
        check_run_dir(rd.root, resume=resume, overwrite=overwrite, protect=protect)
        exists = rd.root.is_dir() and any(rd.root.iterdir())
        if exists and overwrite:
            import shutil

            shutil.rmtree(rd.root)
            exists = False
        if resume:
            old = _normalised(yaml.safe_load(rd.config_path.read_text()))
            old = old if isinstance(old, dict) else {}
            new = config.to_dict()
            if old != new:
                if rd.has_progress():
                    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                    raise RunDirError(
                        f"--resume: the config differs from the one in {rd.config_path} (sections: {', '.join(diff)}); "
                        f"a resumed run must use the same config (start a new run with another --run-dir instead)"
                    )
                # nothing was computed under the old config (the run failed before training): take the new one
                write_text_atomic(rd.config_path, yaml.safe_dump(new, sort_keys=False))
        else:
            rd.root.mkdir(parents=True, exist_ok=True)
            write_text_atomic(rd.config_path, yaml.safe_dump(config.to_dict(), sort_keys=False))
        rd.write_manifest(config)
        return rd

    def has_progress(self) -> bool:
        """Whether anything was computed here: a finished stage, a checkpoint or a ledger entry
        (a run without progress can be removed or restarted without losing work or privacy
        accounting)."""
        if self.state().get("completed"):
            return True
        if self.ledger_path.is_file():
            return True
        return self.checkpoints.is_dir() and any(self.checkpoints.iterdir())

    def write_manifest(self, config, datasets: dict[str, dict] | None = None) -> None:
        manifest = self.read_json(self.manifest_path) or {}
        manifest.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        manifest["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest["versions"] = versions()
        manifest["git_commit"] = _git_commit()
        manifest["seeds"] = {"run": config.seed, "sample": config.sample.seed}
        manifest["argv"] = sys.argv
        if datasets:
            manifest.setdefault("datasets", {}).update(datasets)
        write_json_atomic(self.manifest_path, manifest)

    def record_datasets(self, datasets: dict[str, dict]) -> None:
        """Record the data each role used; a private data set whose content changed since the run
        recorded it is refused: a resumed DP run recomputes its steps from the same secret draws,
        and the same noise on other data could be differenced against what was already shared."""
        manifest = self.read_json(self.manifest_path) or {}
        known = manifest.setdefault("datasets", {})
        for key, info in datasets.items():
            old = known.get(key, {}).get("sha256")
            if key.startswith("private/") and old and info.get("sha256") and old != info["sha256"]:
                from dpgen.data.dataset import DataError

                raise DataError(f"{key}: the private data changed since this run started (sha256 {old[:12]}... now "
                                f"{info['sha256'][:12]}...); a run continues on the data it started with; start a new "
                                f"run directory for the new data")
        known.update(datasets)
        write_json_atomic(self.manifest_path, manifest)

    # --- stage state
    def state(self) -> dict:
        return self.read_json(self.state_path) or {"completed": {}}

    def is_done(self, stage: str) -> bool:
        return stage in self.state()["completed"]

    def next_command(self) -> str:
        """The command that continues this run to a cohort (for error messages that suggest a
        next step that works)."""
        import shlex

        root = shlex.quote(str(self.root))
        if not self.is_done("pretrain"):
            return f"dpgen pretrain {shlex.quote(str(self.config_path))} --run-dir {root} --resume"
        if not self.is_done("finetune"):
            return f"dpgen finetune {root}"
        return f"dpgen sample {root}"

    def mark_done(self, stage: str, info: dict | None = None) -> None:
        st = self.state()
        st["completed"][stage] = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **(info or {})}
        write_json_atomic(self.state_path, st)

    @staticmethod
    def read_json(path: Path) -> Any:
        return json.loads(path.read_text()) if path.is_file() else None

    def load_config(self):
        from dpgen.config import config_from_dict

        if not self.config_path.is_file():
            raise RunDirError(f"{self.root} has no config.yaml; it is not a dpgen run directory")
        return config_from_dict(yaml.safe_load(self.config_path.read_text()))


def _normalised(raw: Any) -> Any:
    """A stored config with today's defaults filled in (a key added to the schema since the run
    started is not a change of config); as stored when it no longer validates."""
    from dpgen.config import ConfigError, config_from_dict

    try:
        return config_from_dict(raw).to_dict()
    except (ConfigError, TypeError, ValueError):
        return raw


# ----------------------------------------------------------------------------- what dpgen made


SWEEP_MARKERS = ("internal/sweep.json", "sweep.json", "pretrain")  # dpgen.sweep: SWEEP_JSON (and its older place), PRETRAIN_DIR


def _read_json_quiet(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def is_run_dir(path: str | Path) -> bool:
    """A run directory dpgen wrote: config.yaml, plus a manifest.json naming dpgen's version or a
    state.json with its stage record."""
    p = Path(path)
    if not (p / "config.yaml").is_file():
        return False
    manifest = _read_json_quiet(p / "manifest.json")
    if isinstance(manifest, dict) and "dpgen" in (manifest.get("versions") or {}):
        return True
    state = _read_json_quiet(p / "state.json")
    return isinstance(state, dict) and isinstance(state.get("completed"), dict)


def is_sweep_dir(path: str | Path) -> bool:
    """A sweep directory dpgen wrote: its sweep.json, or its shared pretraining run in pretrain/."""
    p = Path(path)
    return any((p / m).is_file() for m in SWEEP_MARKERS[:2]) or is_run_dir(p / SWEEP_MARKERS[2])


def enclosing_run(path: str | Path) -> Path | None:
    """The run or sweep directory `path` lies inside (strictly), if any."""
    for parent in Path(path).resolve().parents:
        if is_run_dir(parent) or is_sweep_dir(parent):
            return parent
    return None


def overwrite_refusal(path: str | Path, *, kind: str = "run directory", recognise=is_run_dir,
                      protect: Iterable[str | Path] = (), flag: str = "--run-dir") -> str | None:
    """Why `--overwrite` must not delete `path` (None: it may). dpgen deletes only what it made
    (`recognise`), never the current directory or one above it, never a folder holding a file
    the command reads (`protect`: config, data), never a path inside another run or sweep."""
    p = Path(path)
    if not p.exists():
        return None
    if p.is_symlink():
        return f"{p} is a symbolic link; dpgen does not delete through links (choose another {flag})"
    if not p.is_dir():
        return f"{p} is a file, not a {kind}; dpgen does not delete it (choose another {flag})"
    if not any(p.iterdir()):
        return None
    real, cwd = p.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        return f"{p} is the current directory or holds it; dpgen never deletes it (choose another {flag})"
    for f in protect:
        fr = Path(f).expanduser().resolve()
        if fr == real or real in fr.parents:
            return f"{p} holds {f}, which this command reads; dpgen never deletes it (choose another {flag})"
    outer = enclosing_run(real)
    if outer is not None:
        return f"{p} lies inside the dpgen run or sweep directory {outer}; dpgen does not delete parts of it " \
               f"(choose another {flag})"
    if not recognise(p):
        return f"{p} is not a {kind} written by dpgen; --overwrite only replaces those. Choose another {flag}, " \
               f"or remove the folder yourself if you mean to"
    return None


def check_run_dir(root: str | Path, *, resume: bool = False, overwrite: bool = False,
                  protect: Iterable[str | Path] = ()) -> None:
    """The rules for a run directory a command is about to write; raises RunDirError.

    `--resume` and `--overwrite` exclude each other; `--resume` needs an existing run directory;
    a non-empty directory is refused without one of them; `--overwrite` replaces only what
    `overwrite_refusal` allows. Reads the file system only (the CLI calls it before the heavy
    imports)."""
    root = Path(root)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other: --resume continues the run in --run-dir, "
                          "--overwrite deletes it first; pass one")
    if root.exists() and not root.is_dir():
        raise RunDirError(f"--run-dir {root} is a file, not a directory; choose a folder path")
    exists = root.is_dir() and any(root.iterdir())
    if resume:
        if not exists:
            raise RunDirError(f"--resume: there is no run in {root} (the directory is missing or empty); check the "
                              f"path, or start a new run without --resume")
        if not is_run_dir(root):
            raise RunDirError(f"--resume: {root} is not a dpgen run directory (no config.yaml and state.json / "
                              f"manifest.json written by dpgen); check the path")
        return
    if not exists:
        return
    if overwrite:
        why = overwrite_refusal(root, protect=protect)
        if why:
            raise RunDirError(f"--overwrite refused: {why}")
        return
    if is_run_dir(root):
        raise RunDirError(f"run directory {root} already exists and is not empty; pass --resume to continue it "
                          f"or --overwrite to replace it (deletes it), or choose another --run-dir")
    raise RunDirError(f"{root} already exists and is not empty, and it is not a dpgen run directory; "
                      f"choose another --run-dir")


def default_run_dir(config_name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config_name}-{stamp}"
