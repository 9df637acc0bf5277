"""Downstream utility: classifiers trained four ways, all tested on the real private test split.

Rows (each over several seeds; mean and spread reported):

1. "real": trained on the real private train split without privacy. The ceiling.
2. "dp_real": DP-SGD directly on the private train split at the cohort's epsilon. The baseline a
   synthetic cohort must beat to be worth releasing.
3. "synthetic": trained on the synthetic cohort only (train-synthetic-test-real, TSTR).
4. "synthetic_then_dp_real": row 3's model fine-tuned with DP-SGD on the private train split
   (Osuala et al. 2024's best recipe). Its privacy cost is counted honestly: the cohort already
   spent the run's budget (the run's ledger), the fine-tuning spends more, and the reported
   epsilon is the composition of both in one PLD accountant ("budget": "composed").

Model selection and the private test split
------------------------------------------
The test split is read only after every model is trained and frozen (`train_rows` never sees
it; `evaluate_rows` only predicts). Selection uses:
- row 1: the best epoch by ROC-AUC on the private *val* split. Selecting on private data without
  DP is fine here: row 1 is a non-private ceiling, never a release.
- rows 2 and 4: a fixed number of epochs fixed in advance, no selection at all. Selecting a DP
  model's epoch on the private val split would be a non-private use of private data (a leak that
  the reported epsilon would not cover), and selecting on the test split would bias the number.
- row 3: the best epoch by ROC-AUC on a held-out part of the synthetic cohort (stratified,
  `synthetic_val_fraction`); the cohort is already released, so this costs nothing.
Hyperparameters (`UtilityOptions`) were fixed a priori, not tuned on any private split.

DP-SGD here is dpgen's one DP-SGD loop (dpgen.privacy.dpsgd: the same planner, preflight,
Poisson sampling of privacy units, Opacus clipping and noise as the generator's fine-tuning).
Its randomness (which units each step samples, the noise) comes from a secret seed kept in
the run's internal/ (`EVALUATION_SECRET`), never from a public seed. Each DP classifier is a
mechanism on the private data with its own epsilon; its only outputs are test metrics, which
stay in the data holder's internal review, so it is recorded in the ledger as an internal
mechanism and composed into nothing that is released.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dpgen.core.naming import class_name
from dpgen.data import ImageDataset
from dpgen.evaluation.nets import CNNSpec, SmallCNN
from dpgen.privacy.dpsgd import DPSGDLoop, DPSGDPlan, plan_dpsgd
from dpgen.privacy.engine import PrivacyError, PrivacyUnits
from dpgen.privacy.randomness import SecretStreams

ROWS = ("real", "dp_real", "synthetic", "synthetic_then_dp_real")
ROW_LABELS = {
    "real": "real private train (ceiling, non-private)",
    "dp_real": "DP-SGD on real private train (baseline)",
    "synthetic": "synthetic cohort only (TSTR)",
    "synthetic_then_dp_real": "synthetic pretrain + DP-SGD fine-tune on real",
}


@dataclass
class UtilityOptions:
    """Classifier recipe, fixed in advance (never tuned on a private split)."""

    seeds: int = 3
    # row 1 (and the architecture of all rows)
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    # row 3
    synthetic_epochs: int = 40
    synthetic_max_steps: int = 1500  # caps the cost for large cohorts
    synthetic_val_fraction: float = 0.15
    # rows 2 and 4 (DP-SGD)
    dp_epochs: int = 40
    dp_batch_size: int = 64  # expected Poisson batch
    dp_physical_batch_size: int = 128
    dp_lr: float = 1e-3
    dp_max_grad_norm: float = 1.0
    finetune_epochs: int = 20
    finetune_lr: float = 5e-4
    eval_batch_size: int = 512
    widths_2d: list[int] = field(default_factory=lambda: [32, 64, 128])
    widths_3d: list[int] = field(default_factory=lambda: [16, 32, 64])

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- metrics


def roc_auc(probs: np.ndarray, y: np.ndarray, num_classes: int) -> float | None:
    """ROC-AUC (binary; macro one-vs-rest for several classes) via torchmetrics.
    None when a class is absent from `y` (the AUC is undefined)."""
    from torchmetrics.functional.classification import binary_auroc, multiclass_auroc

    if any(not (y == k).any() for k in range(num_classes)):
        return None
    p, t = torch.as_tensor(probs, dtype=torch.float64), torch.as_tensor(y, dtype=torch.long)
    if num_classes == 2:
        return float(binary_auroc(p[:, 1], t))
    return float(multiclass_auroc(p, t, num_classes=num_classes, average="macro"))


def classification_metrics(probs: np.ndarray, y: np.ndarray, num_classes: int) -> dict:
    pred = probs.argmax(1)
    recall = [float((pred[y == k] == k).mean()) if (y == k).any() else None for k in range(num_classes)]
    present = [r for r in recall if r is not None]
    return {
        "roc_auc": roc_auc(probs, y, num_classes),
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(np.mean(present)) if present else None,
        "recall_per_class": recall,
        "single_class_predictions": bool(len(np.unique(pred)) == 1),
    }


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 512, device="cpu") -> np.ndarray:
    model.eval().to(device)
    out = [torch.softmax(model(x[s:s + batch_size].to(device)), 1).double().cpu() for s in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


def _score(model, x, y, num_classes, opts, device) -> float:
    """Selection score: ROC-AUC, or balanced accuracy where the AUC is undefined."""
    m = classification_metrics(predict_proba(model, x, opts.eval_batch_size, device), y, num_classes)
    return m["roc_auc"] if m["roc_auc"] is not None else m["balanced_accuracy"]


# ----------------------------------------------------------------------------- training


def new_classifier(image_shape: tuple[int, ...], num_classes: int, seed: int, opts: UtilityOptions) -> SmallCNN:
    dims = len(image_shape) - 1
    torch.manual_seed(seed)
    return SmallCNN(CNNSpec(in_channels=image_shape[0], num_classes=num_classes, spatial_dims=dims,
                            widths=list(opts.widths_2d if dims == 2 else opts.widths_3d)))


def train_nonprivate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
                     seed: int, opts: UtilityOptions, num_classes: int, val: tuple | None = None,
                     max_steps: int | None = None, device="cpu", progress: bool = False, desc: str = "") -> tuple[nn.Module, dict]:
    """Plain minibatch training; with `val`, keeps the epoch with the best validation score."""
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * per_epoch if max_steps is None else min(epochs * per_epoch, max_steps)
    best, best_state, best_epoch, step, epoch = -math.inf, None, None, 0, 0
    bar = tqdm(total=total, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    while step < total:
        perm = torch.randperm(n, generator=g)
        model.train()
        for i in range(per_epoch):
            if step >= total:
                break
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
        epoch += 1
        if val is not None:
            s = _score(model, val[0], val[1], num_classes, opts, device)
            if s > best:
                best, best_state, best_epoch = s, copy.deepcopy(model.state_dict()), epoch
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, {"steps": step, "epochs": epoch, "selected_epoch": best_epoch if val is not None else epoch,
                   "val_score": None if val is None else best}


def dp_plan(epsilon: float, delta: float, n_units: int, batch_size: int, epochs: int, max_grad_norm: float = 1.0,
            neighbouring: str = "add_remove", other_events=()) -> DPSGDPlan:
    """The one DP-SGD planner for `epochs` passes over the units (steps = epochs / q); with
    `other_events` (the cohort's), sigma is calibrated so that everything composes to `epsilon`."""
    q = min(1.0, batch_size / n_units)
    return plan_dpsgd(target_epsilon=epsilon, delta=delta, n_units=n_units, batch_size=min(batch_size, n_units),
                      steps=max(1, int(round(epochs / q))), max_grad_norm=max_grad_norm, neighbouring=neighbouring,
                      other_events=other_events, what="the evaluation's DP-SGD classifier")


class ClassifierObjective:
    """Cross-entropy of a classifier, per row: the DP objective of the utility rows."""

    def __init__(self, image_shape: tuple[int, ...], num_classes: int):
        self.image_shape, self.num_classes = tuple(image_shape), num_classes

    def draw_rows(self, rows: dict, generator: torch.Generator) -> dict:
        return rows  # no random inputs

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")

    def preflight_batch(self, n: int, generator: torch.Generator) -> dict:
        return {"x": torch.randn((n, *self.image_shape), generator=generator),
                "y": torch.randint(0, self.num_classes, (n,), generator=generator)}


def train_dp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, units: PrivacyUnits, *, plan: DPSGDPlan, lr: float,
             physical_batch_size: int, secret: SecretStreams, num_classes: int, device="cpu", progress: bool = False,
             desc: str = "") -> tuple[nn.Module, dict]:
    """DP-SGD for the planned number of steps with the one DP-SGD loop; no model selection."""
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loop = DPSGDLoop(model, opt, ClassifierObjective(tuple(x.shape[1:]), num_classes), {"x": x, "y": y}, units, plan,
                     secret, physical_batch_size=physical_batch_size, device=device)
    bar = tqdm(total=plan.steps, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    for step in range(plan.steps):
        loop.step(step)
        bar.update(1)
    bar.close()
    model = loop.close().eval()
    return model, {"steps": plan.steps, "selected_epoch": "fixed (no selection)",
                   "preflight_max_error": loop.preflight_report.max_relative_error}


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) with `fraction` of every class (at least 1, leaving at least 1) in val."""
    rng = np.random.default_rng(seed)
    tr, va = [], []
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        n_val = min(max(1, int(round(fraction * len(idx)))), len(idx) - 1)
        va.append(idx[:n_val])
        tr.append(idx[n_val:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))


# ----------------------------------------------------------------------------- the four rows


@dataclass
class TrainedRows:
    """Frozen models of every row and seed, plus how they were trained; no test data inside."""

    models: dict[str, list[nn.Module]]
    records: dict[str, list[dict]]
    info: dict


def train_real_classifier(x: torch.Tensor, y: torch.Tensor, val: tuple | None, *, num_classes: int, seed: int,
                          opts: UtilityOptions, device="cpu", progress: bool = False) -> tuple[nn.Module, dict]:
    """The ceiling row: a classifier trained without DP on the private train split (model-range
    images `x`), best epoch on `val` (private val). Its penultimate layer is also evaluate's
    real-classifier feature space."""
    return train_nonprivate(new_classifier(tuple(x.shape[1:]), num_classes, seed, opts), x, y, epochs=opts.epochs,
                            batch_size=opts.batch_size, lr=opts.lr, seed=seed, opts=opts, num_classes=num_classes,
                            val=val, device=device, progress=progress, desc=f"real (seed {seed})")


def train_rows(cohort: ImageDataset, private_train: ImageDataset, private_val: ImageDataset | None, num_classes: int,
               *, epsilon: float, delta: float, secret: SecretStreams, opts: UtilityOptions | None = None, rows=ROWS,
               device="cpu", progress: bool = True, neighbouring: str = "add_remove",
               finetune_within: list[dict] | None = None) -> TrainedRows:
    """Train every row and seed. Reads the cohort, private train and private val, never test.
    `secret`: the secret streams of the DP rows (each row and seed gets its own stream).
    `finetune_within`: the cohort's accounting events; when given, the synthetic-pretrain + DP
    fine-tune row is calibrated so that the cohort and the fine-tune compose to `epsilon` (a split
    budget, comparable with the DP-SGD baseline at `epsilon`); the row is left out when the cohort
    alone already spends `epsilon`."""
    opts = opts or UtilityOptions()
    shape = tuple(private_train.image_shape)
    x_real, y_real = private_train.model_tensor(), torch.as_tensor(private_train.labels)
    x_syn, y_syn = cohort.model_tensor(), torch.as_tensor(cohort.labels)
    units = PrivacyUnits.from_subjects(private_train.subjects, len(private_train))
    val_real = None
    if private_val is not None:
        val_real = (private_val.model_tensor(), private_val.labels)
    need_dp = "dp_real" in rows or "synthetic_then_dp_real" in rows
    skipped = None
    plan_args = (delta, len(units), opts.dp_batch_size)
    base_plan = dp_plan(epsilon, *plan_args, opts.dp_epochs, opts.dp_max_grad_norm, neighbouring) if need_dp else None
    ft_plan = None
    if need_dp and "synthetic_then_dp_real" in rows:
        try:
            ft_plan = dp_plan(epsilon, *plan_args, opts.finetune_epochs, opts.dp_max_grad_norm, neighbouring,
                              other_events=finetune_within or ())
        except PrivacyError as err:  # the cohort spent the whole budget: nothing left for a split
            rows = tuple(r for r in rows if r != "synthetic_then_dp_real")
            skipped = str(err)
    models: dict[str, list] = {r: [] for r in rows}
    records: dict[str, list] = {r: [] for r in rows}
    need_syn = "synthetic" in rows or "synthetic_then_dp_real" in rows
    for seed in range(opts.seeds):
        common = {"num_classes": num_classes, "opts": opts, "device": device, "progress": progress}
        if "real" in rows:
            m, rec = train_real_classifier(x_real, y_real, val_real, seed=seed, **common)
            models["real"].append(m)
            records["real"].append(rec)
        if "dp_real" in rows:
            m, rec = train_dp(new_classifier(shape, num_classes, seed, opts), x_real, y_real, units, plan=base_plan,
                              lr=opts.dp_lr, physical_batch_size=opts.dp_physical_batch_size,
                              secret=secret.derived(f"dp_real:{seed}:"), num_classes=num_classes, device=device,
                              progress=progress, desc=f"DP-SGD on real (seed {seed})")
            models["dp_real"].append(m)
            records["dp_real"].append(rec)
        if need_syn:
            tr, va = stratified_split(cohort.labels, opts.synthetic_val_fraction, seed)
            m, rec = train_nonprivate(new_classifier(shape, num_classes, seed, opts), x_syn[tr], y_syn[tr],
                                      epochs=opts.synthetic_epochs, batch_size=opts.batch_size, lr=opts.lr, seed=seed,
                                      val=(x_syn[va], cohort.labels[va]), max_steps=opts.synthetic_max_steps,
                                      desc=f"synthetic (seed {seed})", **common)
            rec.update({"n_train": len(tr), "n_val": len(va)})
            if "synthetic" in rows:
                models["synthetic"].append(m)
                records["synthetic"].append(rec)
            if "synthetic_then_dp_real" in rows:
                m2, rec2 = train_dp(copy.deepcopy(m), x_real, y_real, units, plan=ft_plan, lr=opts.finetune_lr,
                                    physical_batch_size=opts.dp_physical_batch_size,
                                    secret=secret.derived(f"synthetic_then_dp_real:{seed}:"),
                                    num_classes=num_classes, device=device, progress=progress,
                                    desc=f"synthetic -> DP fine-tune (seed {seed})")
                rec2["pretraining"] = rec
                models["synthetic_then_dp_real"].append(m2)
                records["synthetic_then_dp_real"].append(rec2)
    info = {"dp_baseline_plan": base_plan, "dp_finetune_plan": ft_plan, "privacy_unit": units.kind,
            "n_units": len(units), "options": opts.to_dict(), "seeds": opts.seeds,
            "finetune_split_budget": finetune_within is not None, "finetune_skipped": skipped}
    return TrainedRows(models=models, records=records, info=info)


def _mean_std(vals: list) -> dict:
    vals = [v for v in vals if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
            "n": len(vals)}


def evaluate_rows(trained: TrainedRows, private_test: ImageDataset, num_classes: int,
              class_names: list[str] | None = None, device="cpu", batch_size: int = 512) -> dict[str, dict]:
    """Evaluate the frozen models on the private test split: the only place the split is used."""
    x, y = private_test.model_tensor(), private_test.labels
    names = [class_name(k, class_names) for k in range(num_classes)]
    out = {}
    for row, models in trained.models.items():
        per_seed = []
        for seed, (m, rec) in enumerate(zip(models, trained.records[row])):
            met = classification_metrics(predict_proba(m, x, batch_size, device), y, num_classes)
            per_seed.append({"seed": seed, **met, "training": {k: v for k, v in rec.items() if k != "pretraining"}})
        out[row] = {
            "label": ROW_LABELS[row],
            "roc_auc": _mean_std([p["roc_auc"] for p in per_seed]),
            "accuracy": _mean_std([p["accuracy"] for p in per_seed]),
            "balanced_accuracy": _mean_std([p["balanced_accuracy"] for p in per_seed]),
            "recall_per_class": {names[k]: _mean_std([p["recall_per_class"][k] for p in per_seed])
                                 for k in range(num_classes)},
            "seeds_predicting_one_class": int(sum(p["single_class_predictions"] for p in per_seed)),
            "per_seed": per_seed,
        }
    return out


def class_signal(trained: TrainedRows, cohort: ImageDataset, num_classes: int, class_names: list[str] | None = None,
                 device="cpu", batch_size: int = 512) -> dict | None:
    """Does the cohort's class-k image look like class k to a classifier trained on the real data?

    The non-private ceiling classifiers (row "real", trained on private train) applied to the
    cohort: accuracy per class, mean and spread over seeds. A cohort with good marginals but lost
    classes shows accuracies near the class prior. Internal: the classifiers are fitted to private
    data without DP. Needs the "real" row."""
    models = trained.models.get("real") or []
    if not models:
        return None
    x, y = cohort.model_tensor(), np.asarray(cohort.labels)
    names = [class_name(k, class_names) for k in range(num_classes)]
    per_seed = [classification_metrics(predict_proba(m, x, batch_size, device), y, num_classes) for m in models]
    return {
        "what": "classifiers trained on the real private train split (the ceiling row), applied to the cohort: "
                "the fraction of the cohort's class-k images they call class k",
        "accuracy_per_class": {names[k]: _mean_std([p["recall_per_class"][k] for p in per_seed])
                               for k in range(num_classes)},
        "balanced_accuracy": _mean_std([p["balanced_accuracy"] for p in per_seed]),
        "roc_auc": _mean_std([p["roc_auc"] for p in per_seed]),
    }


__all__ = ["ROWS", "ROW_LABELS", "UtilityOptions", "TrainedRows", "train_rows", "evaluate_rows", "dp_plan", "ClassifierObjective",
           "class_signal",
           "classification_metrics", "roc_auc", "train_nonprivate", "train_real_classifier", "train_dp", "new_classifier", "stratified_split"]
