"""Typed schemas of the files dpgen writes and reads back: the parts of
RUN/internal/evaluation/evaluation.json and RUN/internal/audit/probes_summary.json that the
release review (dpgen.report: checklist, internal review) and the sweep read.

The writers (dpgen.evaluation.stage, dpgen.probes.stage) validate what they write against these
models before writing it, and the readers parse the files into them, so the two cannot drift
apart: a field a reader needs is a field the writer is checked to provide. Every field is
optional (a stage run with parts switched off, or a file of another dpgen version, still
parses) and unknown fields are kept (the files hold more than the review reads). The JSON
layout is the writers'; these models only type it. Numbers written as the strict-JSON
strings "inf" / "nan" (dpgen.rundir.to_jsonable) parse as floats.

Both files are internal: statistics of private data computed without DP. Nothing shareable
is built from them (dpgen.report.html's shareable page and the bundle never read them).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

Interval = list[float | None]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="allow")


# ----------------------------------------------------------------------------- evaluation.json


class MeanStd(_Schema):
    mean: float | None = None
    std: float | None = None


class RowPrivacy(_Schema):
    epsilon: float | None = None


class UtilityRow(_Schema):
    """One classifier row (dpgen.evaluation.utility.ROWS): trained on the cohort, on real data, ..."""

    label: str | None = None
    roc_auc: MeanStd | None = None
    accuracy: MeanStd | None = None
    balanced_accuracy: MeanStd | None = None
    seeds_predicting_one_class: int | None = None
    privacy: RowPrivacy | None = None


class Utility(_Schema):
    test_set: str | None = None
    seeds: int | None = None
    rows: dict[str, UtilityRow] = Field(default_factory=dict)


class FidelityValue(_Schema):
    cohort: float | None = None
    cohort_std: float | None = None
    real_vs_real: float | None = None
    real_vs_real_std: float | None = None
    cohort_full: float | None = None
    better: str | None = None


class FidelityGroup(_Schema):
    n_matched: int | None = None
    metrics: dict[str, FidelityValue] = Field(default_factory=dict)  # labelled, e.g. "FD[public-encoder]"


class FeatureExtractorInfo(_Schema):
    name: str | None = None
    description: str | None = None


class Fidelity(_Schema):
    feature_extractor: FeatureExtractorInfo | None = None
    other_feature_spaces: list[FeatureExtractorInfo] = Field(default_factory=list)  # e.g. real-classifier
    real_set: str | None = None
    reference_set: str | None = None
    overall: FidelityGroup | None = None
    per_class: dict[str, FidelityGroup] = Field(default_factory=dict)

    def frechet(self) -> tuple[str, FidelityValue] | None:
        """(label, value) of the Fréchet distance overall (FD[<extractor>]), if there is one."""
        metrics = self.overall.metrics if self.overall else {}
        label = f"FD[{self.feature_extractor.name}]" if self.feature_extractor and self.feature_extractor.name else None
        if label in metrics:
            return label, metrics[label]
        return next(((n, v) for n, v in metrics.items() if n.upper().startswith("FD")), None)


class EvaluationResults(_Schema):
    """RUN/internal/evaluation/evaluation.json (dpgen.evaluation.stage.evaluate_stage)."""

    privacy_note: str | None = None
    figures: list[str] = Field(default_factory=list)
    utility: Utility | None = None
    fidelity: Fidelity | None = None

    @property
    def rows(self) -> dict[str, UtilityRow]:
        return self.utility.rows if self.utility is not None else {}

    def auc(self, row: str) -> tuple[float | None, float | None]:
        """(mean, std) ROC-AUC of a utility row; (None, None) when it is missing."""
        r = self.rows.get(row)
        if r is None or r.roc_auc is None:
            return None, None
        return r.roc_auc.mean, r.roc_auc.std


# ----------------------------------------------------------------------------- probes_summary.json


class TprAtFpr(_Schema):
    fpr: float | None = None
    tpr: float | None = None
    ci: Interval | None = None


class AttackSummary(_Schema):
    n_members: int | None = None
    n_non_members: int | None = None
    auc: float | None = None
    auc_ci: Interval | None = None
    tpr_at_fpr: dict[str, TprAtFpr] = Field(default_factory=dict)  # keyed "1%", "0.1%"


class DPLimitRow(_Schema):
    fpr: float | None = None
    eps_delta: float | None = None  # from (epsilon, delta) alone
    mechanism_pld: float | None = None  # from the composed mechanisms' trade-off curve


class DPLimits(_Schema):
    epsilon: float | None = None
    delta: float | None = None
    neighbouring: str | None = None
    per_fpr: dict[str, DPLimitRow] = Field(default_factory=dict)
    auc_eps_delta: float | None = None


class OverfitControlSummary(_Schema):
    scores: dict[str, AttackSummary] = Field(default_factory=dict)
    caught: bool | None = None
    caught_criterion: str | None = None
    n_images: int | None = None
    steps: int | None = None


class MembershipSummary(_Schema):
    attack: str | None = None
    dp_limits: DPLimits = Field(default_factory=DPLimits)
    dp_model: dict[str, AttackSummary] = Field(default_factory=dict)  # by score: "loss", "reference", ...
    primary_score: str | None = None
    overfit_control: OverfitControlSummary | None = None

    def primary(self) -> tuple[str | None, AttackSummary | None]:
        """The pre-declared headline attack (the first one when the summary names none)."""
        name = self.primary_score if self.primary_score in self.dp_model else next(iter(self.dp_model), None)
        return name, (self.dp_model.get(name) if name is not None else None)


class SetStats(_Schema):
    n: int | None = None
    near_copies: int | None = None
    near_copy_fraction: float | None = None


class SpaceSummary(_Schema):
    synthetic: SetStats | None = None
    held_out: SetStats | None = None


class MemorizationSummary(_Schema):
    flagged: bool | None = None
    verdict: str | None = None
    n_train: int | None = None
    spaces: dict[str, SpaceSummary] = Field(default_factory=dict)  # "pixel", "feature[<extractor>]"


class Identification(_Schema):
    success_rate: float | None = None
    success_ci: Interval | None = None
    prior_kappa: float | None = None


class ConditionSummary(_Schema):
    identification_by_gradient: Identification | None = None


class AttackBound(_Schema):
    bound: float | None = None
    kappa: float | None = None


class TargetSummary(_Schema):
    attack_bound: AttackBound | None = None
    conditions: dict[str, ConditionSummary] = Field(default_factory=dict)  # "no_noise", "run_noise"


class ReconstructionSummary(_Schema):
    targets: dict[str, TargetSummary] = Field(default_factory=dict)


class ProbesSummary(_Schema):
    """RUN/internal/audit/probes_summary.json (dpgen.probes.stage.aggregate_summary)."""

    kind: str | None = None
    internal: bool | None = None
    contains_private_images: bool | None = None
    privacy_note: str | None = None
    memorization: MemorizationSummary | None = None
    membership: MembershipSummary | None = None
    reconstruction: ReconstructionSummary | None = None


__all__ = ["EvaluationResults", "Utility", "UtilityRow", "MeanStd", "Fidelity", "FidelityGroup", "FidelityValue",
           "ProbesSummary", "MembershipSummary", "AttackSummary", "DPLimits", "MemorizationSummary",
           "ReconstructionSummary", "TargetSummary"]
