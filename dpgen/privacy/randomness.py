"""Where dpgen's random numbers come from, and which ones must stay secret.

Two kinds of randomness, never mixed:

- **Public streams** (`step_generator(config.seed, step, stream)`): everything that never
  touches private data or whose outcome may be known to anyone: public pretraining batches,
  the preflight's random inputs, sampling the cohort, the auditor's canaries. They come
  from `config.seed`, which is written to the manifest, so a run is reproducible.
- **Secret streams** (`secret_streams(rd)`): every random choice that touches private data in
  a DP mechanism: which units take part in a DP-SGD step (the Poisson sample), the per-row
  draws of a private row's loss (diffusion timestep and noise, GAN latents), and the DP
  noise. They come from a seed drawn from the OS and kept only in the run directory's
  `internal/secrets.json` (mode 0600). The subsampling amplification the accountant counts
  on holds only if nobody can recompute which steps a unit took part in; the noise protects
  only if nobody can subtract it; and a per-row draw tied to a public seed and a row's
  position would let one unit's presence change the draws of the others.

Every generator is a pure function of (seed, step, stream), so a run that is killed and
resumed recomputes exactly the steps it lost. A generator can be made on any device
(`device="cuda"`): Opacus draws the DP noise with the generator it is given, on the
parameters' device.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

# The one generator of every stream, public or secret (dpgen.core.seeding); re-exported here.
from dpgen.core.seeding import step_generator

SECRETS_FILE = "secrets.json"
#: The DP-SGD streams of the generator's fine-tuning (the name the key has always had).
DP_SECRET = "noise_seed"
#: The evaluation's DP classifiers (results stay internal; their randomness is secret anyway).
EVALUATION_SECRET = "evaluation_seed"


def new_secret_seed() -> int:
    """64 bits from the OS's CSPRNG."""
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


def _write_secret_file(path: Path, secrets: dict) -> None:
    """Atomically, with permissions 0600 from the start (never world-readable, not even briefly)."""
    from dpgen.rundir import write_json_atomic

    write_json_atomic(path, secrets, mode=0o600)


def read_secret(internal: Path, name: str = DP_SECRET) -> int:
    """The run's secret seed `name`, created on first use (in `internal/secrets.json`)."""
    path = Path(internal) / SECRETS_FILE
    secrets = json.loads(path.read_text()) if path.is_file() else {}
    if name not in secrets:
        secrets[name] = new_secret_seed()
        _write_secret_file(path, secrets)
    elif path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)  # a file written by an older dpgen (0644)
    return int(secrets[name])


@dataclass(frozen=True)
class SecretStreams:
    """The secret randomness of one DP mechanism: Poisson sample, per-row draws, noise.

    `stream` separates mechanisms of one run (e.g. "autoencoder:" for a DP autoencoder
    fine-tune), so two mechanisms never share a draw. The seed never leaves this object and
    internal/secrets.json; `repr` does not show it.
    """

    secret_seed: int
    stream: str = ""

    def __repr__(self) -> str:
        return f"SecretStreams(stream={self.stream!r}, seed=<secret>)"

    def poisson(self, step: int) -> torch.Generator:
        """Decides which privacy units take part in `step`."""
        return step_generator(self.secret_seed, step, f"{self.stream}poisson")

    def draws(self, step: int, where: str) -> torch.Generator:
        """Per-row random inputs of a private row's loss (timesteps, noise, GAN latents)."""
        return step_generator(self.secret_seed, step, f"{self.stream}draw:{where}")

    def noise(self, step: int, device: str | torch.device = "cpu") -> torch.Generator:
        """The DP noise of `step`, on the device of the parameters it is added to."""
        return step_generator(self.secret_seed, step, f"{self.stream}noise", device=torch.device(device))

    def extra(self, name: str, step: int = 0) -> torch.Generator:
        """Any other secret draw of this mechanism (e.g. the noise of a DP histogram)."""
        return step_generator(self.secret_seed, step, f"{self.stream}{name}")

    def derived(self, stream: str) -> "SecretStreams":
        return SecretStreams(self.secret_seed, f"{self.stream}{stream}")


def secret_streams(internal: Path, name: str = DP_SECRET, stream: str = "") -> SecretStreams:
    """The secret streams of a run directory (`internal` is `RunDir.internal`)."""
    return SecretStreams(read_secret(internal, name), stream)


def fresh_secret_streams(stream: str = "") -> SecretStreams:
    """Secret streams that nobody stores (throwaway DP runs: the privacy audit's engine)."""
    return SecretStreams(new_secret_seed(), stream)


__all__ = ["DP_SECRET", "EVALUATION_SECRET", "SECRETS_FILE", "SecretStreams", "fresh_secret_streams", "new_secret_seed",
           "read_secret", "secret_streams", "step_generator"]
