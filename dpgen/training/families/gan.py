"""Conditional GAN with a private discriminator.

Pretraining: both networks on public data (ordinary GAN training, no privacy cost).
DP fine-tuning: only the discriminator D sees private data. Each privacy step is one DP-SGD
step of D (one forward on the real rows and one on their paired fakes, one backward, one
clipped-and-noised optimizer step: `DiscriminatorObjective`), followed by
`finetune.generator_steps` generator updates that run with D's hooks disabled and compute
gradients for G's parameters only (torch.autograd.grad), so they touch neither D's per-unit
gradients nor the DP optimizer. Their conditions and latents are drawn uniformly from a public
stream (never from the private table), their batch is the configured `finetune.batch_size` (never
the Poisson sample's size), and their loss may add MSGAN's mode-seeking term
(`finetune.generator_mode_seeking`). G runs in training mode (batch statistics of its own fakes)
only inside these updates; every fake paired with a private row is drawn in eval mode. G, its
batch-norm statistics included, is then a function of D's DP outputs and public randomness: its
privacy follows by post-processing, and the ledger says so.
"""

from __future__ import annotations

import torch

from dpgen.data import ImageDataset
from dpgen.core.checkpoints import save_weights
from dpgen.core.seeding import step_generator
from dpgen.models.gan import ConditionalGAN, gan_spec_from_config
from dpgen.models.lora import merge_lora
from dpgen.models.registry import build_from_checkpoint
from dpgen.privacy.engine import PrivacyUnits
from dpgen.privacy.ledger import PrivacyLedger
from dpgen.privacy.schema import PrivacySource
from dpgen.rundir import RunDir
from dpgen.training.common import EMA, TBLogger, load_state, save_state
from dpgen.training.dp import (
    MECHANISM, DPJob, histogram_events, register_finetune_plan, release_histogram_once, run_dp_job,
)
from dpgen.training.families.shared import (
    check_private, check_public, check_trainable, classes_start_unconditional, config_errors, private_rows, public_rows,
    record_weights, summary, uses_public_labels,
)
from dpgen.training.loop import run_steps
from dpgen.training.objectives import DiscriminatorObjective
from dpgen.training.trainable import select_trainable

NAME = "cgan"
GENERATOR_SOURCE = f"post-processing of {MECHANISM} (discriminator)"
ADAM_BETAS = (0.5, 0.999)  # the DCGAN setting


def uniform_conditions(spec, n: int, g: torch.Generator, device, null_labels: bool = False) -> dict:
    """Conditions for generator updates: uniform labels (or the null label, in a pretraining
    that ignores the public labels) and uniform attributes (public: no data)."""
    labels = torch.randint(0, spec.num_classes, (n,), generator=g)
    cond = {"labels": (torch.full_like(labels, spec.num_classes) if null_labels else labels).to(device)}
    if spec.attribute_names:
        cond["attributes"] = (torch.rand((n, len(spec.attribute_names)), generator=g) * 2 - 1).to(device)
        cond["attr_mask"] = torch.ones(n, device=device)
    return cond


def generator_step(objective: DiscriminatorObjective, d, g_model, g_opt, g_ema, spec, n: int, gen: torch.Generator,
                   device, null_labels: bool = False, mode_seeking: float = 0.0) -> float:
    loss = objective.generator_loss(d, uniform_conditions(spec, n, gen, device, null_labels), gen, mode_seeking)
    params = [p for p in g_model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)  # G only: D's .grad and per-sample state untouched
    for p, gr in zip(params, grads):
        p.grad = gr
    g_opt.step()
    g_opt.zero_grad(set_to_none=True)
    g_ema.update(g_model)
    return loss.item()


@torch.no_grad()
def standing_batch_stats(generator, spec, seed: int, device, null_labels: bool = False, batches: int = 32,
                         batch_size: int = 64) -> None:
    """Recompute the generator's batch-norm statistics for its current weights ("standing
    statistics", BigGAN): the running averages were gathered along the raw weights' path, so the
    EMA weights with them decode every latent to nearly the same image (measured: pixel diversity
    0.38 vs 0.78 with fresh statistics). Uses only the generator and public randomness
    (uniform conditions, `config.seed`): post-processing, no privacy cost."""
    norms = [m for m in generator.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    generator.train()
    g = step_generator(seed, 0, "standing_stats")
    for _ in range(batches):
        cond = uniform_conditions(spec, batch_size, g, device, null_labels)
        z = torch.randn((batch_size, spec.latent_dim), generator=g).to(device)
        generator(z, cond["labels"], cond.get("attributes"), cond.get("attr_mask"))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    generator.eval()


def pretrain(config, rd: RunDir, public: ImageDataset | None, image_shape, device, progress: bool = True) -> dict:
    torch.manual_seed(config.seed)
    with config_errors():
        spec = gan_spec_from_config(config, tuple(image_shape))
    gan = ConditionalGAN(spec).to(device)
    check_trainable(config, gan.discriminator)  # fail now, not after pretraining
    cfg = config.pretrain
    steps = cfg.steps if public is not None else 0
    G, D = gan.generator, gan.discriminator
    g_ema, d_ema = EMA(G, cfg.ema_decay), EMA(D, 0.0)
    last = float("nan")
    if steps:
        check_public(public, image_shape)
        rows = public_rows(public, spec.num_classes, spec.attributes, uses_public_labels(config))
        objective = DiscriminatorObjective(G, spec)
        g_opt = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=ADAM_BETAS)
        d_opt = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=ADAM_BETAS)
        parts = {"g.": (G, g_ema, g_opt), "d.": (D, d_ema, d_opt)}
        state_path = rd.pretrain_state
        start = load_state(state_path, parts)[0] if state_path.is_file() else 0
        logger = TBLogger(rd.logs / "pretrain")
        n = len(rows["x"])

        def step_fn(step: int) -> float:
            g = step_generator(config.seed, step, "pretrain")
            idx = torch.randint(0, n, (cfg.batch_size,), generator=g)
            batch = objective.draw_rows({k: v[idx].to(device) for k, v in rows.items()}, g)
            d_loss = objective.loss(D, batch).mean()
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
            d_ema.update(D)
            g_loss = generator_step(objective, D, G, g_opt, g_ema, spec, cfg.batch_size, g, device,
                                    null_labels=not uses_public_labels(config))
            logger.scalar("pretrain/generator_loss", g_loss, step + 1)
            return d_loss.item()

        last = run_steps(start=start, total=steps, step_fn=step_fn, checkpoint_every=cfg.checkpoint_every,
                         desc="pretrain", checkpoint_fn=lambda done: save_state(state_path, parts, done),
                         log_fn=logger.scalar, progress=progress)
        logger.close()
    g_ema.copy_to(G)
    standing_batch_stats(G, spec, config.seed, device, null_labels=not uses_public_labels(config))
    info = {"stage": "pretrain", "steps": steps, "data": public.info() if public is not None and steps else None,
            "privacy": "public data only" if steps else "random initialisation"}
    weights = gan.state_dict()
    if not uses_public_labels(config):
        info["classes_start_unconditional"] = classes_start_unconditional(gan, weights, spec.num_classes)
    save_weights(rd.pretrain_weights, weights, spec.to_dict(), info, family=NAME)
    return {"steps": steps, "final_loss": last, "parameters": sum(p.numel() for p in G.parameters()),
            "discriminator_parameters": sum(p.numel() for p in D.parameters())}


def finetune(config, rd: RunDir, private: ImageDataset, device, progress: bool = True) -> dict:
    _, gan, spec, _ = build_from_checkpoint(rd.pretrain_weights, NAME)
    check_private(private, spec.image_shape, spec.num_classes)
    gan.to(device)
    G, D = gan.generator, gan.discriminator
    ft = config.finetune
    units = PrivacyUnits.from_subjects(private.subjects, len(private))
    ledger = PrivacyLedger(rd.ledger_path)
    torch.manual_seed(config.seed)
    with config_errors():
        trainable = select_trainable(D, ft.trainable, lora_rank=ft.lora_rank, lora_alpha=ft.lora_alpha,
                                     lora_targets=ft.lora_targets)
    settings, plan = register_finetune_plan(
        config, ledger, units, other_events=histogram_events(config),
        trains="cGAN discriminator (the generator never sees private data)", trainable=trainable,
    )
    # The generator is in eval mode whenever D sees private rows, so a fake depends on its own
    # row's draw and label only. Its running statistics change only inside its own updates
    # (after_step: public randomness, D's DP outputs), i.e. by post-processing.
    G.eval()
    objective = DiscriminatorObjective(G, spec, private_rows=True)
    g_opt = torch.optim.Adam(G.parameters(), lr=ft.generator_lr or ft.lr, betas=ADAM_BETAS)
    g_ema = EMA(G, ft.ema_decay)
    logger = TBLogger(rd.logs / "finetune_generator")

    def after_step(step: int, dp) -> None:
        # The generator update: D's hooks off, gradients for G only, conditions uniform.
        # Batch norm may use batch statistics here: the batch is ft.batch_size fakes from public
        # randomness, no private row. G is back in eval mode before D's next private step.
        dp.gsm.disable_hooks()
        G.train()
        try:
            gen = step_generator(config.seed, step, "generator")
            for _ in range(ft.generator_steps):
                loss = generator_step(objective, dp.gsm, G, g_opt, g_ema, spec, ft.batch_size, gen, device,
                                      mode_seeking=ft.generator_mode_seeking)
        finally:
            G.eval()
            dp.gsm.enable_hooks()
        logger.scalar("finetune/generator_loss", loss, step + 1)

    job = DPJob(MECHANISM, D, objective, private_rows(private, spec.attributes), settings, plan,
                rd.finetune_state, extra_parts={"g.": (G, g_ema, g_opt)},
                after_step=after_step)
    result = run_dp_job(config, rd, ledger, job, units, device, progress,
                        before_steps=lambda: release_histogram_once(config, rd, ledger, private.labels, units,
                                                                    spec.num_classes, job.rows.get("attributes")))
    logger.close()
    result["ema"].copy_to(D)
    merge_lora(D)
    g_ema.copy_to(G)
    standing_batch_stats(G, spec, config.seed, device)
    info = {"stage": "finetune", "privacy": result["complete"], "preflight": result["report"].to_dict(),
            "trainable": trainable, "generator_privacy": GENERATOR_SOURCE, "privacy_mechanisms": [MECHANISM]}
    save_weights(rd.finetune_weights, gan.state_dict(), spec.to_dict(), info, family=NAME)
    record_weights(rd, ledger, PrivacySource(kind="dp", mechanisms=(MECHANISM,),
                                         note="discriminator by DP-SGD; generator by post-processing of it"))
    record_weights(rd, ledger, PrivacySource(kind="post_processing", mechanisms=(MECHANISM,),
                                         note="generator updates read only the DP discriminator"),
                   name="generator_weights", tensors="generator.*")
    return summary(config, result, units, trainable)
