"""The run directory: the unit users move around.

    RUN/
      config.yaml           the resolved config (round-trips through `load_config`)
      manifest.json         versions, git commit, seeds, dataset fingerprints (never data)
      state.json            which stages finished
      checkpoints/          safetensors weights (+ a JSON sidecar with what rebuilds the model)
      privacy/ledger.jsonl  the append-only privacy ledger
      logs/                 TensorBoard event files
      cohort/               the synthetic cohort (.npz in MedMNIST layout, PNG grids)
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
from typing import Any, Iterator

import torch
import yaml
from safetensors.torch import load_file, save_file

from dpgen.distributed import is_writer

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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json_atomic(path: str | Path, obj: Any, mode: int | None = None) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", mode)


def save_tensors_atomic(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    if not is_writer():  # distributed fine-tuning: rank 0 writes the run directory
        return
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """safetensors only: loading weights never unpickles."""
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
        return self.cohort / "cohort.npz"

    # --- lifecycle
    @classmethod
    def create(cls, root: str | Path, config, *, resume: bool = False, overwrite: bool = False) -> "RunDir":
        """Open a run directory for writing.

        An existing, non-empty directory is refused unless the user asked to `resume` it
        (same config required) or to `overwrite` it (removed first).
        """
        rd = cls(Path(root))
        exists = rd.root.exists() and any(rd.root.iterdir())
        if exists and overwrite:
            import shutil

            shutil.rmtree(rd.root)
            exists = False
        if exists and not resume:
            raise RunDirError(
                f"run directory {rd.root} already exists and is not empty; "
                f"pass --resume to continue it or --overwrite to replace it"
            )
        if resume and exists:
            if not rd.config_path.is_file():
                raise RunDirError(f"{rd.root} has no config.yaml; it is not a dpgen run directory")
            old = yaml.safe_load(rd.config_path.read_text())
            new = config.to_dict()
            if old != new:
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                raise RunDirError(
                    f"--resume: the config differs from the one in {rd.config_path} (sections: {', '.join(diff)}); "
                    f"a resumed run must use the same config"
                )
        else:
            rd.root.mkdir(parents=True, exist_ok=True)
            write_text_atomic(rd.config_path, yaml.safe_dump(config.to_dict(), sort_keys=False))
        rd.write_manifest(config)
        return rd

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
        manifest = self.read_json(self.manifest_path) or {}
        manifest.setdefault("datasets", {}).update(datasets)
        write_json_atomic(self.manifest_path, manifest)

    # --- stage state
    def state(self) -> dict:
        return self.read_json(self.state_path) or {"completed": {}}

    def is_done(self, stage: str) -> bool:
        return stage in self.state()["completed"]

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


def default_run_dir(config_name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config_name}-{stamp}"
