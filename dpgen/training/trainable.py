"""Which parameters DP fine-tuning updates (`finetune.trainable`).

DP-SGD adds noise of the same scale to every trainable coordinate, so the total noise grows
with the number of trainable parameters while the clipped signal does not. Updating fewer
parameters (attention blocks only, as in DP-LDM and the DP cardiac-MRI work; or low-rank
adapters) is often the better trade. Everything not selected keeps its public-pretrained
value and is frozen (requires_grad False), which Opacus respects: it computes per-sample
gradients only for trainable parameters, and the preflight checks exactly those.
"""

from __future__ import annotations

from monai.networks.blocks import CrossAttentionBlock, SABlock, SpatialAttentionBlock
from torch import nn

from dpgen.models.lora import add_lora

_ATTENTION = (SpatialAttentionBlock, SABlock, CrossAttentionBlock)


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from monai.networks.nets.diffusion_model_unet import SpatialTransformer

    kinds = (*_ATTENTION, SpatialTransformer)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def _conditioning_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n.endswith("class_embedding")]


def select_trainable(model: nn.Module, mode: str, *, lora_rank: int = 4, lora_alpha: float | None = None,
                     lora_targets: list[str] | None = None) -> dict:
    """Freeze all but the selected parameters (adds LoRA adapters for mode 'lora').

    Returns a summary for the ledger: mode, trainable / total parameter counts, and the
    modules (or LoRA layers) that train.
    """
    total = sum(p.numel() for p in model.parameters())
    info: dict = {"mode": mode}
    if mode == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        info["modules"] = ["<all>"]
    elif mode in ("attention", "attention+conditioning"):
        chosen = _attention_modules(model)
        if not chosen:
            raise ValueError(f"finetune.trainable = {mode!r}, but the model has no attention blocks")
        if mode == "attention+conditioning":
            cond = _conditioning_modules(model)
            if not cond:
                raise ValueError("finetune.trainable = 'attention+conditioning', but the model has no conditioning embedding")
            chosen += cond
        for p in model.parameters():
            p.requires_grad_(False)
        for _, m in chosen:
            for p in m.parameters():
                p.requires_grad_(True)
        # keep only outermost names for the summary
        names = [n for n, _ in chosen]
        info["modules"] = [n for n in names if not any(n != o and n.startswith(o + ".") for o in names)]
    elif mode == "lora":
        targets = list(lora_targets or [])
        try:
            info["lora_layers"] = add_lora(model, targets, lora_rank, lora_alpha)
        except ValueError as err:
            raise ValueError(f"finetune.lora_targets = {targets}: {err}") from None
        info.update({"lora_rank": lora_rank, "lora_alpha": float(lora_alpha or lora_rank)})
    else:
        raise ValueError(f"unknown finetune.trainable {mode!r}")
    info["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info["total_parameters"] = total
    return info
