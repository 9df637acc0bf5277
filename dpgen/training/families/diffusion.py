"""Pixel-space conditional diffusion: public pretraining and DP fine-tuning of the UNet."""

from __future__ import annotations

import torch

from dpgen.data import ImageDataset
from dpgen.models import ConditionalDiffusion, diffusion_spec_from_config
from dpgen.models.lora import merge_lora
from dpgen.privacy.engine import PrivacyUnits
from dpgen.privacy.ledger import PrivacyLedger
from dpgen.privacy.schema import ArtifactEntry, PrivacySource
from dpgen.rundir import RunDir
from dpgen.training.common import build_from_checkpoint, save_weights
from dpgen.training.dp import (
    MECHANISM, DPJob, histogram_events, register_finetune_plan, release_histogram_once, run_dp_job,
)
from dpgen.training.families.shared import (
    FINETUNE_WEIGHTS, PRETRAIN_WEIGHTS, check_private, check_public, check_trainable, classes_start_unconditional,
    config_errors, private_rows, public_rows, train_public, uses_public_labels,
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
        state_name="pretrain_state.safetensors", stream="pretrain", desc="pretrain", device=device, progress=progress,
    )
    weights = {**model.state_dict(), **ema.state_dict()}
    info = {"stage": "pretrain", "steps": steps, "data": public.info() if public is not None and steps else None,
            "privacy": "public data only" if steps else "random initialisation"}
    if not uses_public_labels(config):
        info["classes_start_unconditional"] = classes_start_unconditional(model, weights, spec.num_classes)
    save_weights(rd.checkpoints / PRETRAIN_WEIGHTS, weights, spec.to_dict(), info, family=NAME)
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
                rd.checkpoints / "finetune_state.safetensors")
    return job, trainable


def released_state(model, ema) -> dict:
    """EMA weights with any LoRA adapters folded in: the original architecture."""
    ema.copy_to(model)
    merge_lora(model)
    return model.state_dict()


def finetune(config, rd: RunDir, private: ImageDataset, device, progress: bool = True) -> dict:
    _, model, spec, _ = build_from_checkpoint(rd.checkpoints / PRETRAIN_WEIGHTS, NAME)
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
    save_weights(rd.checkpoints / FINETUNE_WEIGHTS, released_state(model, job_result["ema"]), spec.to_dict(), info,
                 family=NAME)
    record_weights(ledger, PrivacySource(kind="dp", mechanisms=(MECHANISM,)))
    return summary(config, job_result, units, trainable)


def record_weights(ledger: PrivacyLedger, source: PrivacySource, name: str = "finetune_weights",
                   path: str = f"checkpoints/{FINETUNE_WEIGHTS}", **more) -> None:
    """The fine-tuned weights as a ledger artifact (once)."""
    if ledger.latest("artifact", name=name) is None:
        ledger.append(ArtifactEntry(name=name, path=path, privacy_source=source, **more))


def summary(config, job_result: dict, units: PrivacyUnits, trainable: dict) -> dict:
    c = job_result["complete"]
    return {"steps": c["steps_done"], "sigma": c["sigma"], "sample_rate": c["sample_rate"], "unit": units.kind,
            "epsilon": job_result["epsilon"], "epsilon_rdp": job_result["epsilon_rdp"], "delta": config.privacy.delta,
            "final_loss": job_result["final_loss"], "preflight_max_error": job_result["report"].max_relative_error,
            "resumed_from": job_result["resumed_from"], "trainable": trainable["mode"],
            "trainable_parameters": trainable["trainable_parameters"], "world_size": job_result["world_size"],
            **({"rank_digests": job_result["rank_digests"]} if job_result["rank_digests"] else {})}
