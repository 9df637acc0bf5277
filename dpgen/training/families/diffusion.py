"""Pixel-space conditional diffusion: public pretraining and DP fine-tuning of the UNet."""

from __future__ import annotations

import torch

from dpgen.data import ImageDataset
from dpgen.core.checkpoints import save_weights
from dpgen.models.diffusion import ConditionalDiffusion, diffusion_spec_from_config
from dpgen.models.lora import merge_lora
from dpgen.models.registry import build_from_checkpoint
from dpgen.privacy.engine import PrivacyUnits
from dpgen.privacy.ledger import PrivacyLedger
from dpgen.privacy.schema import PrivacySource
from dpgen.rundir import RunDir
from dpgen.training.dp import (
    MECHANISM, DPJob, histogram_events, register_finetune_plan, release_histogram_once, run_dp_job,
)
from dpgen.training.families.shared import (
    check_private, check_public, check_trainable, classes_start_unconditional, config_errors, private_rows, public_rows,
    record_weights, summary, train_public, uses_public_labels,
)
from dpgen.training.objectives import DiffusionObjective
from dpgen.training.trainable import select_trainable

NAME = "diffusion"


def pretrain(config, rd: RunDir, public: ImageDataset | None, image_shape, device, progress: bool = True) -> dict:
    """Train the diffusion model on public data; writes checkpoints/pretrain.safetensors (EMA)."""
    torch.manual_seed(config.seed)
    with config_errors():
        spec = diffusion_spec_from_config(config, tuple(image_shape))
        model = ConditionalDiffusion(spec).to(device)
    check_trainable(config, model)
    cfg = config.pretrain
    steps = cfg.steps if public is not None else 0
    if steps:
        check_public(public, image_shape)
    ema, last_loss = train_public(
        config, rd, model=model, objective=DiffusionObjective(model, config.model.cond_drop_prob),
        rows=public_rows(public, spec.num_classes, spec.attributes, uses_public_labels(config)) if steps else {},
        steps=steps,
        batch_size=cfg.batch_size, lr=cfg.lr, ema_decay=cfg.ema_decay, checkpoint_every=cfg.checkpoint_every,
        state_path=rd.pretrain_state, stream="pretrain", desc="pretrain", device=device, progress=progress,
    )
    weights = {**model.state_dict(), **ema.state_dict()}
    info = {"stage": "pretrain", "steps": steps, "data": public.info() if public is not None and steps else None,
            "privacy": "public data only" if steps else "random initialisation"}
    if not uses_public_labels(config):
        info["classes_start_unconditional"] = classes_start_unconditional(model, weights, spec.num_classes)
    save_weights(rd.pretrain_weights, weights, spec.to_dict(), info, family=NAME)
    return {"steps": steps, "final_loss": last_loss, "parameters": sum(p.numel() for p in model.parameters())}


def unet_job(config, rd: RunDir, ledger: PrivacyLedger, model: ConditionalDiffusion, rows: dict, units: PrivacyUnits,
             other_events: list[dict], trains: str) -> tuple[DPJob, dict]:
    """The DP-SGD job of a diffusion UNet (pixels or latents), with its plan registered."""
    ft = config.finetune
    torch.manual_seed(config.seed)  # LoRA initialisation
    with config_errors():
        trainable = select_trainable(model, ft.trainable, lora_rank=ft.lora_rank, lora_alpha=ft.lora_alpha,
                                     lora_targets=ft.lora_targets)
    settings, plan = register_finetune_plan(config, ledger, units, other_events=other_events, trains=trains,
                                            trainable=trainable)
    job = DPJob(MECHANISM, model, DiffusionObjective(model, config.model.cond_drop_prob), rows, settings, plan,
                rd.finetune_state)
    return job, trainable


def released_state(model, ema) -> dict:
    """EMA weights with any LoRA adapters folded in: the original architecture."""
    ema.copy_to(model)
    merge_lora(model)
    return model.state_dict()


def finetune(config, rd: RunDir, private: ImageDataset, device, progress: bool = True) -> dict:
    _, model, spec, _ = build_from_checkpoint(rd.pretrain_weights, NAME)
    check_private(private, spec.image_shape, spec.num_classes)
    units = PrivacyUnits.from_subjects(private.subjects, len(private))
    ledger = PrivacyLedger(rd.ledger_path)
    rows = private_rows(private, spec.attributes)
    job, trainable = unet_job(config, rd, ledger, model, rows, units, histogram_events(config), "diffusion UNet")
    job_result = run_dp_job(config, rd, ledger, job, units, device, progress,
                            before_steps=lambda: release_histogram_once(config, rd, ledger, private.labels, units,
                                                                        spec.num_classes, rows.get("attributes")))
    complete, report = job_result["complete"], job_result["report"]
    info = {"stage": "finetune", "privacy": complete, "preflight": report.to_dict(), "trainable": trainable,
            "privacy_mechanisms": [MECHANISM]}
    save_weights(rd.finetune_weights, released_state(model, job_result["ema"]), spec.to_dict(), info,
                 family=NAME)
    record_weights(rd, ledger, PrivacySource(kind="dp", mechanisms=(MECHANISM,)))
    return summary(config, job_result, units, trainable)
