"""Non-private pretraining on public data (no privacy cost: no private data is read)."""

from __future__ import annotations

import torch

from dpgen.data import ImageDataset
from dpgen.models import ConditionalDiffusion, diffusion_spec_from_config
from dpgen.privacy.engine import step_generator
from dpgen.rundir import RunDir
from dpgen.training.common import EMA, TBLogger, load_training_state, save_training_state, save_weights
from dpgen.training.loop import run_steps
from dpgen.training.objectives import DiffusionObjective

PRETRAIN_WEIGHTS = "pretrain.safetensors"


def pretrain(config, rd: RunDir, public: ImageDataset | None, image_shape, device, progress: bool = True) -> dict:
    """Train the diffusion model on public data; writes checkpoints/pretrain.safetensors (EMA)."""
    torch.manual_seed(config.seed)
    spec = diffusion_spec_from_config(config, tuple(image_shape))
    model = ConditionalDiffusion(spec).to(device)
    cfg = config.pretrain
    steps = cfg.steps if public is not None else 0
    ema = EMA(model, cfg.ema_decay)
    last_loss = float("nan")
    if steps > 0:
        if tuple(public.image_shape) != tuple(image_shape):
            from dpgen.data import DataError

            raise DataError(
                f"public data {public.path} has images of shape {public.image_shape} but the private data has "
                f"{tuple(image_shape)}; pretraining needs the same channels and size"
            )
        objective = DiffusionObjective(model, config.model.cond_drop_prob)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
        state_path = rd.checkpoints / "pretrain_state.safetensors"
        start = 0
        if state_path.is_file():
            start, _ = load_training_state(state_path, model, ema, optimizer)
        data = public.model_tensor()
        # Public labels condition the model where they fit the private label space; others
        # train the unconditional ("null") embedding.
        labels = torch.as_tensor(public.labels)
        labels = torch.where(labels < spec.num_classes, labels, torch.full_like(labels, spec.num_classes))
        logger = TBLogger(rd.logs / "pretrain")
        model.train()

        def step_fn(step: int) -> float:
            g = step_generator(config.seed, step, "pretrain")
            idx = torch.randint(0, len(data), (cfg.batch_size,), generator=g)
            batch = objective.draw(data[idx].to(device), labels[idx].to(device), g)
            loss = objective.loss(model, batch).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema.update(model)
            return loss.item()

        last_loss = run_steps(
            start=start, total=steps, step_fn=step_fn, checkpoint_every=cfg.checkpoint_every, desc="pretrain",
            checkpoint_fn=lambda done: save_training_state(state_path, model, ema, optimizer, done),
            log_fn=logger.scalar, progress=progress,
        )
        logger.close()
    weights = {**model.state_dict(), **ema.state_dict()}
    info = {"stage": "pretrain", "steps": steps, "data": public.info() if public is not None and steps else None,
            "privacy": "public data only" if steps else "random initialisation"}
    save_weights(rd.checkpoints / PRETRAIN_WEIGHTS, weights, spec.to_dict(), info)
    return {"steps": steps, "final_loss": last_loss, "parameters": sum(p.numel() for p in model.parameters())}
