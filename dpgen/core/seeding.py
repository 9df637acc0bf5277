"""The one way dpgen makes a random generator: a pure function of (seed, step, stream).

Public streams (`step_generator(config.seed, step, "pretrain")`, sampling, the preflight's random
inputs, the probes) come from seeds anyone may know. The secret streams of DP mechanisms
(`dpgen.privacy.randomness.SecretStreams`) use this same function with a seed kept in the run's
internal/secrets.json. Because every generator is a function of (seed, step, stream), a killed
run that resumes recomputes exactly the steps it lost, and two streams never share a draw.
"""

from __future__ import annotations

import hashlib

import torch


def step_generator(seed: int, step: int, stream: str, device: str | torch.device = "cpu") -> torch.Generator:
    """An independent generator for one (seed, step, purpose), on `device`."""
    digest = hashlib.sha256(f"{seed}:{step}:{stream}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


__all__ = ["step_generator"]
