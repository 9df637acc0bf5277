"""DP-SGD fine-tuning on the private data, with its privacy plan and ledger.

Order of events (each one leaves the run directory consistent if the process dies):
1. plan: sample rate q = batch_size / N_units, steps T, sigma calibrated so that the
   composition of everything released (DP-SGD + any DP label histogram + a DP autoencoder
   fine-tune) stays within the target epsilon. The plan is appended to the ledger once; a
   resumed run re-reads it and refuses to continue under a different plan.
2. preflight: Opacus' per-sample gradients vs. autograd on random inputs of the shape the
   DP-trained network sees; refuse to train if they differ.
3. steps, with a checkpoint (then a ledger progress entry) every `checkpoint_every` steps.
4. completion: the spent epsilon is recomputed from the steps actually taken and checked
   against the target before the weights are written where sampling reads them.

The family trainers (dpgen.training.families) assemble these pieces (dpgen.training.dp) for
their networks; this module dispatches on `model.generator`.
"""

from __future__ import annotations

import json

from dpgen.data import ImageDataset
from dpgen.rundir import RunDir
from dpgen.training.dp import (  # noqa: F401  (re-exported: the stable names of the DP path)
    AE_MECHANISM, MECHANISM, PREFLIGHT_BATCH, DPSettings, dp_event, histogram_events, plan_mechanism,
    secret_noise_seed, spent_epsilon,
)
from dpgen.training.families import trainer
from dpgen.training.families.shared import FINETUNE_WEIGHTS, PRETRAIN_WEIGHTS  # noqa: F401

__all__ = ["finetune", "privacy_plan", "describe", "MECHANISM", "AE_MECHANISM", "PREFLIGHT_BATCH", "FINETUNE_WEIGHTS",
           "PRETRAIN_WEIGHTS", "dp_event", "plan_mechanism", "secret_noise_seed", "spent_epsilon", "DPSettings"]


def privacy_plan(config, n_units: int, unit_kind: str) -> dict:
    """The main mechanism's plan with the DP label histogram as the only other event."""
    return plan_mechanism(config, DPSettings.from_finetune(config.finetune), n_units, unit_kind,
                          mechanism=MECHANISM, budget=config.privacy.epsilon, other_events=histogram_events(config),
                          trains=config.model.generator)


def finetune(config, rd: RunDir, private: ImageDataset, device, progress: bool = True) -> dict:
    return trainer(config.model.generator).finetune(config, rd, private, device, progress)


def describe(result: dict) -> str:
    return json.dumps(result, indent=2, default=str)
