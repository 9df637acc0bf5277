"""Privacy probes: does the DP guarantee hold in practice, with attacks that could have failed.

    from dpgen.probes import audit_stage, format_summary
    results = audit_stage(config, RunDir("runs/quick"))
    print(format_summary(results))

Modules: `memorization` (nearest private training images of each synthetic image, Carlini ratio,
max correlation, with a held-out reference), `membership` (loss / reference-model attacks on the
diffusion model, the non-DP overfit control, a discriminator attack for GANs), `reconstruction`
(gradient inversion and gradient-matching identification on a DP-SGD update, next to the ReRo
bound), `stats` (AUC, TPR at low FPR, bootstrap intervals, DP limits), `figures`, `stage` (the
stage function, outputs), `commands` (`dpgen audit`).

Everything goes to RUN/internal/audit/ (never released): per-image results, figures, and the
aggregate summary the internal release review reads. The probes are computed on private data
without DP, so not even their aggregates leave the run directory.
"""

from dpgen.core.lazy import lazy_exports

# Lazy: `dpgen --help` imports dpgen.probes.commands, which should not load torch.
__all__ = ["AuditOptions", "audit_stage", "format_summary", "aggregate_summary"]
__getattr__ = lazy_exports(__name__, dict.fromkeys(__all__, "stage"))
