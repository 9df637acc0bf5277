"""Evaluation of a synthetic cohort: fidelity (with real-vs-real references) and downstream utility.

    from dpgen.evaluation import evaluate_stage, format_summary
    metrics = evaluate_stage(config, RunDir("runs/quick"))
    print(format_summary(metrics))

Modules: `features` (feature extractors: the public encoder, Inception, any torch module),
`fidelity` (FD, KID, precision/recall/density/coverage), `utility` (classifiers trained four
ways, the DP ones on the one DP-SGD loop of dpgen.privacy), `inputs` (cohort/real data loading
and checks), `stage` (the stage function), `figures`, `commands` (the `dpgen evaluate`
subcommand). This package reads cohorts and data sources, never a generator or its training
code. Everything it computes stays under RUN/internal/evaluation/.

Lazy: `dpgen --help` and `dpgen evaluate`'s argument errors import `commands` only, not torch.
"""

from dpgen.core.lazy import lazy_exports

_EXPORTS = {
    "evaluate_stage": "stage", "format_summary": "stage", "EvalOptions": "stage",
    "UtilityOptions": "utility", "ROWS": "utility",
    "FeatureExtractor": "features", "EvaluationError": "features", "extract_features": "features",
    "compare_to_reference": "fidelity", "fidelity_metrics": "fidelity", "frechet_distance": "fidelity",
    "kernel_distance": "fidelity", "prdc": "fidelity",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
