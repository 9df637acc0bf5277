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
their networks; this module dispatches to the trainer the registry (dpgen.models.registry)
names for `model.generator`.
"""

from __future__ import annotations

from dpgen.data import ImageDataset
from dpgen.rundir import RunDir
from dpgen.models.registry import family

__all__ = ["finetune"]


def finetune(config, rd: RunDir, private: ImageDataset, device, progress: bool = True) -> dict:
    return family(config.model.generator).trainer_module.finetune(config, rd, private, device, progress)
