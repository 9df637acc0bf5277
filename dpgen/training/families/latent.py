"""Latent diffusion: an AutoencoderKL trained on public data (then frozen, by default) and a
conditional diffusion UNet trained on its scaled latents.

Privacy: the DP-trained network is the UNet; private images reach it only as latents from the
frozen public encoder (a fixed map), and DP-SGD clips each unit's gradient of the UNet loss on
its latents. The scale factor is estimated on public latents only. If the user asks for
`autoencoder.finetune.mode: dp`, the autoencoder is fine-tuned on the private images with
DP-SGD first: a second mechanism (`dp_sgd:autoencoder`) with its own plan, preflight and
progress in the same ledger, calibrated to `epsilon_fraction` of the budget on its own; the
UNet's noise is then calibrated so that everything composes to at most privacy.epsilon.
"""

from __future__ import annotations

import torch

from dpgen.data import ImageDataset
from dpgen.core.checkpoints import load_checkpoint, save_weights
from dpgen.models.latent import LatentDiffusion, LatentDiffusionSpec, latent_spec_from_config
from dpgen.models.registry import build_from_checkpoint
from dpgen.models.autoencoder import LatentAutoencoder, encode_dataset
from dpgen.privacy.engine import PrivacyUnits
from dpgen.privacy.ledger import PrivacyLedger
from dpgen.privacy.schema import PrivacySource
from dpgen.rundir import RunDir
from dpgen.training.dp import (
    AE_MECHANISM, MECHANISM, DPJob, DPSettings, histogram_events, plan_mechanism, register_plan,
    release_histogram_once, run_dp_job,
)
from dpgen.training.families.diffusion import released_state, unet_job
from dpgen.training.families.shared import (
    check_private, check_public, check_trainable, classes_start_unconditional, config_errors, private_rows, public_rows,
    record_weights, summary, train_public, uses_public_labels,
)
from dpgen.training.objectives import AutoencoderObjective, DiffusionObjective

NAME = "latent_diffusion"
AE_WEIGHTS = "autoencoder.safetensors"  # public autoencoder + scale factor
AE_DP_WEIGHTS = "autoencoder_dp.safetensors"  # after DP fine-tuning (optional)
SCALE_SAMPLE = 512  # public images used to estimate the latent scale


def _pretrain_autoencoder(config, rd, spec: LatentDiffusionSpec, public, device, progress) -> tuple[LatentAutoencoder, float, dict]:
    path = rd.checkpoints / AE_WEIGHTS
    ae = LatentAutoencoder(spec.autoencoder).to(device)
    if path.is_file():  # a resumed run: the public autoencoder is done
        _, tensors, _, info = load_checkpoint(path)
        ae.load_state_dict(tensors)
        return ae, float(info["scale_factor"]), info
    a = config.autoencoder
    steps = a.pretrain.steps if public is not None else 0
    objective = AutoencoderObjective(spec.autoencoder, a.kl_weight, a.reconstruction_loss)
    ema, last = train_public(
        config, rd, model=ae, objective=objective, rows={"x": public.model_tensor()} if steps else {}, steps=steps,
        batch_size=a.pretrain.batch_size, lr=a.pretrain.lr, ema_decay=0.0, checkpoint_every=a.pretrain.checkpoint_every,
        state_path=rd.checkpoints / "autoencoder_state.safetensors", stream="autoencoder-pretrain", desc="autoencoder_pretrain",
        device=device, progress=progress,
    )
    if public is not None:
        # Scale factor on PUBLIC latents only (Rombach et al.): 1 / std of the latents.
        sample = public.model_tensor()[:SCALE_SAMPLE]
        z = encode_dataset(ae, sample, device)
        scale = float(1.0 / z.std().clamp_min(1e-6))
        scale_source = f"1/std of {len(sample)} public latents"
    else:
        scale, scale_source = 1.0, "no public data: 1.0"
    info = {"stage": "autoencoder_pretrain", "steps": steps, "final_loss": last, "scale_factor": scale,
            "scale_source": scale_source, "privacy": "public data only" if steps else "random initialisation"}
    save_weights(path, ae.state_dict(), spec.autoencoder.to_dict(), info, family="autoencoder")
    return ae, scale, info


def pretrain(config, rd: RunDir, public: ImageDataset | None, image_shape, device, progress: bool = True) -> dict:
    torch.manual_seed(config.seed)
    with config_errors():
        spec = latent_spec_from_config(config, image_shape)
        model = LatentDiffusion(spec)
    if public is not None:
        check_public(public, image_shape)
    check_trainable(config, model.unet)  # fail now, not after pretraining
    ae, scale, ae_info = _pretrain_autoencoder(config, rd, spec, public, device, progress)
    spec.scale_factor = scale
    model.autoencoder.load_state_dict(ae.state_dict())
    unet = model.unet.to(device)
    cfg = config.pretrain
    steps = cfg.steps if public is not None else 0
    rows = {}
    if steps:
        latents = encode_dataset(ae, public.model_tensor(), device) * scale
        rows = public_rows(public, spec.num_classes, spec.attributes, uses_public_labels(config), x=latents)
    ema, last = train_public(
        config, rd, model=unet, objective=DiffusionObjective(unet, config.model.cond_drop_prob), rows=rows,
        steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, ema_decay=cfg.ema_decay,
        checkpoint_every=cfg.checkpoint_every, state_path=rd.pretrain_state, stream="pretrain",
        desc="pretrain", device=device, progress=progress,
    )
    ema.copy_to(unet)
    info = {"stage": "pretrain", "steps": steps, "data": public.info() if public is not None and steps else None,
            "autoencoder": ae_info, "privacy": "public data only" if steps else "random initialisation"}
    weights = model.state_dict()
    if not uses_public_labels(config):
        info["classes_start_unconditional"] = classes_start_unconditional(model, weights, spec.num_classes)
    save_weights(rd.pretrain_weights, weights, spec.to_dict(), info, family=NAME)
    return {"steps": steps, "final_loss": last, "autoencoder_steps": ae_info["steps"],
            "autoencoder_final_loss": ae_info.get("final_loss"), "scale_factor": scale,
            "latent_shape": list(spec.unet.image_shape),
            "parameters": sum(p.numel() for p in unet.parameters()),
            "autoencoder_parameters": sum(p.numel() for p in ae.parameters())}


def finetune(config, rd: RunDir, private: ImageDataset, device, progress: bool = True) -> dict:
    _, model, spec, _ = build_from_checkpoint(rd.pretrain_weights, NAME)
    check_private(private, spec.image_shape, spec.num_classes)
    units = PrivacyUnits.from_subjects(private.subjects, len(private))
    ledger = PrivacyLedger(rd.ledger_path)
    ae_cfg = config.autoencoder.finetune
    ae_dp = ae_cfg.mode == "dp"
    other = histogram_events(config)
    result_ae = None
    model.to(device)
    if ae_dp:
        # Plan both mechanisms before any private data is read: the autoencoder's sigma spends
        # epsilon_fraction of the budget alone; the UNet's sigma is calibrated with it (and
        # any histogram) as other events, so the composition stays within privacy.epsilon.
        ae_settings = DPSettings.from_autoencoder(ae_cfg, config.finetune.grad_sample_mode)
        ae_plan = register_plan(ledger, plan_mechanism(
            config, ae_settings, units, mechanism=AE_MECHANISM,
            budget=config.privacy.epsilon * ae_cfg.epsilon_fraction, other_events=[], trains="autoencoder",
            epsilon_fraction=ae_cfg.epsilon_fraction,
        ))
        other = [ae_plan.event.model_dump(), *other]
    rows_img = private_rows(private, spec.attributes)
    job, trainable = unet_job(config, rd, ledger, model.unet, {}, units, other, "latent diffusion UNet")

    if ae_dp:
        ae_path = rd.checkpoints / AE_DP_WEIGHTS
        if ae_path.is_file():
            model.autoencoder.load_state_dict(load_checkpoint(ae_path)[1])
        else:
            ae = model.autoencoder
            for p in ae.parameters():
                p.requires_grad_(True)
            ae_job = DPJob(AE_MECHANISM, ae, AutoencoderObjective(spec.autoencoder, config.autoencoder.kl_weight,
                                                           config.autoencoder.reconstruction_loss),
                           {"x": rows_img["x"]}, ae_settings, ae_plan, rd.checkpoints / "autoencoder_dp_state.safetensors",
                           stream="autoencoder:", log_name="autoencoder_finetune")
            result_ae = run_dp_job(config, rd, ledger, ae_job, units, device, progress)
            result_ae["ema"].copy_to(ae)
            save_weights(ae_path, ae.state_dict(), spec.autoencoder.to_dict(),
                         {"stage": "autoencoder_finetune", "privacy": result_ae["complete"],
                          "preflight": result_ae["report"].to_dict()}, family="autoencoder")
            record_weights(rd, ledger, PrivacySource(kind="dp", mechanisms=(AE_MECHANISM,)),
                           name="autoencoder_dp_weights", path=ae_path)
    for p in model.autoencoder.parameters():
        p.requires_grad_(False)

    # The private images as latents of the (frozen) encoder, scaled with the public factor.
    latents = encode_dataset(model.autoencoder, rows_img["x"], device) * spec.scale_factor
    job.rows = {**rows_img, "x": latents}
    result = run_dp_job(config, rd, ledger, job, units, device, progress,
                        before_steps=lambda: release_histogram_once(config, rd, ledger, private.labels, units,
                                                                    spec.num_classes, rows_img.get("attributes")))
    released_state(model.unet, result["ema"])
    used = (MECHANISM, AE_MECHANISM) if ae_dp else (MECHANISM,)
    info = {"stage": "finetune", "privacy": result["complete"], "preflight": result["report"].to_dict(),
            "trainable": trainable, "autoencoder": "DP fine-tuned" if ae_dp else "public, frozen",
            "privacy_mechanisms": list(used)}
    save_weights(rd.finetune_weights, model.state_dict(), spec.to_dict(), info, family=NAME)
    record_weights(rd, ledger, PrivacySource(kind="dp", mechanisms=used,
                                         note="" if ae_dp else "the autoencoder saw public data only"))
    out = summary(config, result, units, trainable)
    out["latent_shape"] = list(spec.unet.image_shape)
    if ae_dp:
        out["autoencoder_sigma"] = ae_plan.sigma
        out["autoencoder_steps"] = ae_plan.planned_steps
    return out
