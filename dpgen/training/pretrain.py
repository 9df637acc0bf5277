"""Non-private pretraining on public data (no privacy cost: no private data is read).

Dispatches to the family trainer named by `model.generator` (dpgen.training.families).
"""

from __future__ import annotations

from dpgen.data import ImageDataset
from dpgen.rundir import RunDir
from dpgen.training.families import trainer
from dpgen.training.families.shared import PRETRAIN_WEIGHTS

__all__ = ["pretrain", "PRETRAIN_WEIGHTS"]


def pretrain(config, rd: RunDir, public: ImageDataset | None, image_shape, device, progress: bool = True) -> dict:
    """Train the configured generator on public data; writes checkpoints/pretrain.safetensors."""
    return trainer(config.model.generator).pretrain(config, rd, public, image_shape, device, progress)
