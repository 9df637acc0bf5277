"""What the family trainers share: turning datasets into row tensors, checks, the public loop."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from dpgen.data import DataError, ImageDataset
from dpgen.models.conditioning import AttributeSpace
from dpgen.core.seeding import step_generator
from dpgen.privacy.engine import PrivacyUnits
from dpgen.privacy.ledger import PrivacyLedger
from dpgen.privacy.schema import ArtifactEntry, PrivacySource
from dpgen.rundir import RunDir
from dpgen.training.common import EMA, TBLogger, load_state, save_state
from dpgen.training.loop import run_steps

@contextmanager
def config_errors():
    """Model-building problems that come from the config (shapes the networks cannot take,
    LoRA targets with no layer) reach the user as one-line config errors."""
    from dpgen.config import ConfigError

    try:
        yield
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"config error: {err}") from None


def check_trainable(config, model: nn.Module) -> None:
    """Build the fine-tuning selection on a copy now, so a bad `finetune.trainable` /
    `lora_targets` fails before pretraining, not after it."""
    from dpgen.training.trainable import select_trainable

    ft = config.finetune
    with config_errors():
        select_trainable(copy.deepcopy(model), ft.trainable, lora_rank=ft.lora_rank, lora_alpha=ft.lora_alpha,
                         lora_targets=ft.lora_targets)


def attribute_rows(ds: ImageDataset, space: AttributeSpace, role: str, required: bool) -> dict:
    """Normalized attributes (fixed public ranges) and a mask saying which rows have them."""
    n = len(ds)
    if not len(space):
        return {}
    have = list(ds.attribute_names or [])
    missing = [a for a in space.names if a not in have]
    if missing:
        if required:
            raise DataError(
                f"{ds.path}: the {role} data has no attribute column {missing[0]!r} (the model is conditioned on "
                f"{', '.join(space.names)}); give it in the labels CSV and data.{role}.attribute_columns"
            )
        return {"attributes": torch.zeros(n, len(space)), "attr_mask": torch.zeros(n)}
    cols = [have.index(a) for a in space.names]
    raw = torch.as_tensor(np.asarray(ds.attributes)[:, cols], dtype=torch.float32)
    return {"attributes": space.normalize(raw), "attr_mask": torch.ones(n)}


def public_rows(public: ImageDataset, num_classes: int, space: AttributeSpace, use_labels: bool,
                x: torch.Tensor | None = None) -> dict:
    """With `use_labels` (config `data.public_labels: use`), public labels condition the model
    where they fit the private label space; all other rows train the unconditional ("null")
    embedding. Attributes are used when the public data has them."""
    labels = torch.as_tensor(public.labels)
    if use_labels:
        labels = torch.where(labels < num_classes, labels, torch.full_like(labels, num_classes))
    else:
        labels = torch.full_like(labels, num_classes)
    return {"x": public.model_tensor() if x is None else x, "labels": labels,
            **attribute_rows(public, space, "public", required=False)}


def uses_public_labels(config) -> bool:
    return config.data.public_labels == "use"


def classes_start_unconditional(model: nn.Module, state: dict[str, torch.Tensor], num_classes: int) -> list[str]:
    """Copy the null-label row of every label embedding (nn.Embedding with num_classes + 1
    rows) into the class rows of `state`: after a pretraining that ignored the public labels
    the class rows were never trained, and starting them at the unconditional embedding lets
    fine-tuning learn the classes from an unconditional model. Returns the keys changed."""
    keys = [f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, nn.Embedding) and m.num_embeddings == num_classes + 1]
    for k in keys:
        w = state[k].clone()
        w[:num_classes] = w[num_classes]
        state[k] = w
    return keys


def private_rows(private: ImageDataset, space: AttributeSpace, x: torch.Tensor | None = None) -> dict:
    return {"x": private.model_tensor() if x is None else x, "labels": torch.as_tensor(private.labels),
            **attribute_rows(private, space, "private", required=True)}


def check_private(private: ImageDataset, image_shape, num_classes: int) -> None:
    if list(private.image_shape) != list(image_shape):
        raise DataError(
            f"private data {private.path} has images of shape {private.image_shape}, the model was built for "
            f"{tuple(image_shape)}"
        )
    if private.labels.max() >= num_classes:
        raise DataError(f"{private.path}: label {int(private.labels.max())} is outside data.num_classes={num_classes}")


def check_public(public: ImageDataset, image_shape) -> None:
    if tuple(public.image_shape) != tuple(image_shape):
        raise DataError(
            f"public data {public.path} has images of shape {public.image_shape} but the private data has "
            f"{tuple(image_shape)}; pretraining needs the same channels and size: set data.public.transform "
            f"(resize: true, channels: true) to fit the public images to the private shape"
        )


def train_public(config, rd: RunDir, *, model: nn.Module, objective, rows: dict, steps: int, batch_size: int,
                 lr: float, ema_decay: float, checkpoint_every: int, state_path, stream: str, desc: str,
                 device, progress: bool) -> tuple[EMA, float]:
    """Non-private training on public rows (random minibatches, per-step seeded, resumable)."""
    ema = EMA(model, ema_decay)
    if steps <= 0:
        return ema, float("nan")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    parts = {"": (model, ema, optimizer)}
    start = load_state(state_path, parts)[0] if state_path.is_file() else 0
    logger = TBLogger(rd.logs / desc)
    n = len(rows["x"])
    model.train()

    def step_fn(step: int) -> float:
        g = step_generator(config.seed, step, stream)
        idx = torch.randint(0, n, (batch_size,), generator=g)
        batch = objective.draw_rows({k: v[idx].to(device) for k, v in rows.items()}, g)
        loss = objective.loss(model, batch).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update(model)
        return loss.item()

    last = run_steps(start=start, total=steps, step_fn=step_fn, checkpoint_every=checkpoint_every, desc=desc,
                     checkpoint_fn=lambda done: save_state(state_path, parts, done), log_fn=logger.scalar,
                     progress=progress)
    logger.close()
    return ema, last


def record_weights(rd: RunDir, ledger: PrivacyLedger, source: PrivacySource, name: str = "finetune_weights",
                   path=None, **more) -> None:
    """Weights as a ledger artifact (once); default: the fine-tuned generator's."""
    if ledger.latest("artifact", name=name) is None:
        ledger.append(ArtifactEntry(name=name, path=rd.rel(path or rd.finetune_weights), privacy_source=source, **more))


def summary(config, job_result: dict, units: PrivacyUnits, trainable: dict) -> dict:
    c = job_result["complete"]
    return {"steps": c["steps_done"], "sigma": c["sigma"], "sample_rate": c["sample_rate"], "unit": units.kind,
            "epsilon": job_result["epsilon"], "epsilon_rdp": job_result["epsilon_rdp"], "delta": config.privacy.delta,
            "final_loss": job_result["final_loss"], "preflight_max_error": job_result["report"].max_relative_error,
            "resumed_from": job_result["resumed_from"], "trainable": trainable["mode"],
            "trainable_parameters": trainable["trainable_parameters"], "world_size": job_result["world_size"],
            **({"rank_digests": job_result["rank_digests"]} if job_result["rank_digests"] else {})}
