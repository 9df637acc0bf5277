"""Reading the cohort and the real splits, and the checks that make bad input fail clearly.

Every error names both sides: the cohort (its path, shape, labels) and the real data it is
compared with (dataset, split, shape, label space).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpgen.core.naming import class_name
from dpgen.data import DataError, ImageDataset, load_dataset, load_npz, resolve_source

COHORT_FILE = Path("cohort") / "cohort.npz"


def describe_shape(shape: tuple[int, ...]) -> str:
    c, spatial = shape[0], shape[1:]
    kind = "volumes" if len(spatial) == 3 else "images"
    return f"{c}-channel {len(spatial)}D {kind} of {'x'.join(map(str, spatial))}"


def _real_name(ds: ImageDataset) -> str:
    return f"{ds.name} ({ds.path}, split {ds.split!r})"


def load_cohort(run_root: str | Path, cohort_path: str | Path | None = None) -> ImageDataset:
    """The run's cohort (RUN/cohort/cohort.npz), or `cohort_path` when given."""
    path = Path(cohort_path) if cohort_path else Path(run_root) / COHORT_FILE
    if not path.is_file():
        from dpgen.rundir import RunDir

        hint = "" if cohort_path else f" (continue the run: `{RunDir(Path(run_root)).next_command()}`, or pass --cohort PATH)"
        raise DataError(f"no cohort at {path}{hint}")
    ds = load_npz(path, "train", name="cohort")
    return ds


def load_real(spec, split: str, role: str = "private", against: ImageDataset | None = None) -> ImageDataset:
    """One split of a real source, with an error that says what needed it."""
    try:
        return load_dataset(spec, split=split)
    except DataError as err:
        why = f" to compare the cohort {against.path} with" if against is not None else ""
        raise DataError(f"evaluation needs the {role} data's {split!r} split{why}, but it cannot be read: {err}") from None


def require_split(spec, split: str, against: ImageDataset | None = None) -> None:
    """Fail early (before minutes of training) when a .npz source has no `split`.

    Reads only the archive's table of contents, never the split's images or labels, so the
    private test split stays unread until the final evaluation. Other source kinds are checked
    when the split is loaded.
    """
    try:
        path = resolve_source(spec.source, download=False)
    except DataError:
        return
    if not (path.is_file() and path.suffix == ".npz"):
        return
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
    need = {f"{split}_images", f"{split}_labels"}
    if not need <= keys:
        why = f" to compare the cohort {against.path} with" if against is not None else ""
        raise DataError(
            f"evaluation needs the private data's {split!r} split{why}, but {path} has no "
            f"{' / '.join(sorted(need - keys))} (it holds: {', '.join(sorted(keys))})"
        )


def check_real(ds: ImageDataset, num_classes: int, class_names: list[str] | None = None,
               need_all_classes: bool = True) -> None:
    """Labels of a real split lie in the configured label space (and every class occurs)."""
    bad = sorted({int(v) for v in np.unique(ds.labels) if v >= num_classes})
    if bad:
        raise DataError(
            f"the real data {_real_name(ds)} has label(s) {bad}, outside data.num_classes={num_classes} (classes 0..{num_classes - 1})"
        )
    if need_all_classes:
        missing = [k for k in range(num_classes) if not (ds.labels == k).any()]
        if missing:
            names = ", ".join(f"{k} ({class_name(k, class_names)})" for k in missing)
            raise DataError(
                f"the real data {_real_name(ds)} has no images of class {names}; per-class metrics and "
                f"ROC-AUC need every one of the {num_classes} classes of data.num_classes"
            )


def check_cohort(cohort: ImageDataset, real: ImageDataset, num_classes: int,
                 class_names: list[str] | None = None) -> None:
    """The cohort matches the real data: image shape and channels, label space, no empty class."""
    if tuple(cohort.image_shape) != tuple(real.image_shape):
        raise DataError(
            f"the cohort {cohort.path} holds {describe_shape(cohort.image_shape)} (shape {tuple(cohort.image_shape)}), "
            f"but the real data {_real_name(real)} holds {describe_shape(real.image_shape)} "
            f"(shape {tuple(real.image_shape)}); they must match to be compared"
        )
    if cohort.images.dtype != np.uint8:
        raise DataError(f"the cohort {cohort.path} has images of dtype {cohort.images.dtype}; a cohort is stored as uint8")
    labels = np.unique(cohort.labels)
    bad = sorted(int(v) for v in labels if v >= num_classes)
    if bad:
        raise DataError(
            f"the cohort {cohort.path} has label(s) {bad}, but the real data {real.name} has classes 0..{num_classes - 1} "
            f"(data.num_classes={num_classes}); cohort labels: {sorted(int(v) for v in labels)}"
        )
    counts = {k: int((cohort.labels == k).sum()) for k in range(num_classes)}
    empty = [k for k, c in counts.items() if c == 0]
    if empty:
        names = ", ".join(f"{k} ({class_name(k, class_names)})" for k in empty)
        raise DataError(
            f"the cohort {cohort.path} has no images of class {names}, which the real data {real.name} has "
            f"(classes 0..{num_classes - 1}); cohort class counts: {counts}. Every class needs images for "
            f"per-class metrics and for a classifier trained on the cohort"
        )
    few = [k for k, c in counts.items() if c < 2]
    if few:
        raise DataError(
            f"the cohort {cohort.path} has a single image of class {few[0]} ({class_name(few[0], class_names)}); "
            f"evaluation needs at least 2 per class (cohort class counts: {counts})"
        )


__all__ = ["load_cohort", "load_real", "require_split", "check_cohort", "check_real", "describe_shape"]
