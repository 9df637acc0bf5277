"""One trainer per generator family, looked up by name (a registry, not an if-chain).

Each family module has `pretrain(config, rd, public, image_shape, device, progress)` and
`finetune(config, rd, private, device, progress)`; the DP-SGD machinery they share lives in
`dpgen.training.dp`.
"""

from __future__ import annotations

from types import ModuleType

from dpgen.training.families import diffusion, gan, latent

TRAINERS: dict[str, ModuleType] = {m.NAME: m for m in (diffusion, latent, gan)}


def trainer(name: str) -> ModuleType:
    if name not in TRAINERS:
        raise ValueError(f"unknown model.generator {name!r}; known: {', '.join(TRAINERS)}")
    return TRAINERS[name]
