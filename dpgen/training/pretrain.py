"""Non-private pretraining on public data (no privacy cost: no private data is read).

Dispatches to the trainer of the family named by `model.generator` (dpgen.models.registry).
"""

from __future__ import annotations

from dpgen.data import ImageDataset
from dpgen.models.registry import family
from dpgen.rundir import RunDir

__all__ = ["pretrain"]


def pretrain(config, rd: RunDir, public: ImageDataset | None, image_shape, device, progress: bool = True) -> dict:
    """Train the configured generator on public data; writes checkpoints/pretrain.safetensors."""
    return family(config.model.generator).trainer_module.pretrain(config, rd, public, image_shape, device, progress)
