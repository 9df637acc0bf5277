"""Evaluation of a synthetic cohort: fidelity (with real-vs-real references) and downstream utility.

    from dpgen.evaluation import evaluate_stage, format_summary
    metrics = evaluate_stage(config, RunDir("runs/quick"))
    print(format_summary(metrics))

Modules: `features` (feature extractors: the public encoder, Inception, any torch module),
`fidelity` (FD, KID, precision/recall/density/coverage), `utility` (classifiers trained four
ways), `inputs` (cohort/real data loading and checks), `stage` (the stage function), `figures`,
`commands` (the `dpgen evaluate` subcommand). This package reads cohorts and never imports
training code.
"""

from dpgen.evaluation.features import EvaluationError, FeatureExtractor, extract_features
from dpgen.evaluation.fidelity import compare_to_reference, fidelity_metrics, frechet_distance, kernel_distance, prdc
from dpgen.evaluation.stage import EvalOptions, evaluate_stage, format_summary
from dpgen.evaluation.utility import ROWS, UtilityOptions

__all__ = [
    "evaluate_stage", "format_summary", "EvalOptions", "UtilityOptions", "ROWS", "FeatureExtractor",
    "EvaluationError", "extract_features", "compare_to_reference", "fidelity_metrics", "frechet_distance",
    "kernel_distance", "prdc",
]
