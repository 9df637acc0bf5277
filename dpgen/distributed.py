"""DP fine-tuning on several processes (GPUs, nodes) with torch.distributed.

How a distributed DP-SGD step works (dpgen.privacy.engine.DPSGD does the steps):

* Every rank draws the *same* global Poisson sample of privacy units (the sampler is seeded
  per step from the run's secret seed, which rank 0 reads from internal/ and broadcasts over
  the process group: `broadcast_int`) and keeps every `world_size`-th sampled unit. So
  the units that take part in a step are exactly those of the single-process run: each
  unit with probability q, which is what the accountant assumes. (Opacus'
  DistributedPoissonBatchSampler instead samples each rank's shard with the same q; that
  is equivalent, but a global mask lets a test compare with the single-process run.)
* Each rank clips its units' gradients and sums them; Opacus' DistributedDPOptimizer adds
  the noise on rank 0 only, all-reduces the sums and divides by the expected batch size
  (q * N / world_size per rank, then by world_size in the reduction): one noise draw of
  std sigma * C on the sum of all clipped gradients, as in the single-process run.
* The model is broadcast from rank 0 at the start (Opacus' DPDDP); after that every rank
  applies the same reduced gradient, so the replicas stay identical. dpgen checks this at
  every checkpoint (a checksum of every parameter, all-gathered) and stops if they drift.
* Only rank 0 writes: ledger, checkpoints, logs, weights (`is_writer`).

Launch with torchrun or `accelerate launch` (they set RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); dpgen does not use accelerate's wrappers, which would re-wrap the
DP sampler and optimizer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Long enough for rank 0 to write a checkpoint or evaluate while the others wait.
TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_distributed() -> bool:
    """True when a launcher (torchrun, accelerate launch) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return World()


def is_writer() -> bool:
    """Whether this process writes run-directory files (rank 0, or the only process)."""
    return world().is_main


def init_from_env(device: str = "auto") -> tuple[World, str]:
    """Join the process group a launcher set up; returns the world and this rank's device.

    Backend: NCCL on CUDA, gloo on CPU. `device="auto"` picks cuda:LOCAL_RANK when CUDA is
    available. Without a launcher this is a no-op (a single process).
    """
    if not launched_distributed():
        return World(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda") or str(device).startswith("cuda")
    if use_cuda:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    elif device == "auto":
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT)
    return world(), device


def barrier() -> None:
    if world().distributed:
        dist.barrier()


def shutdown(wait: bool = True) -> None:
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def rank_share(chosen, w: World):
    """This rank's part of a step's (globally identical) Poisson sample."""
    return chosen[w.rank::w.size] if w.distributed else chosen


def parameter_digests(module: torch.nn.Module) -> list[float]:
    """One checksum of all parameters per rank (all-gathered); equal when the replicas are."""
    with torch.no_grad():
        local = sum((p.detach().double() * (1 + i % 7)).sum() for i, p in enumerate(module.parameters()))
        local = torch.as_tensor(local, dtype=torch.float64).reshape(1)
    w = world()
    if not w.distributed:
        return [float(local)]
    dev = next(module.parameters()).device
    gathered = [torch.zeros(1, dtype=torch.float64, device=dev) for _ in range(w.size)]
    dist.all_gather(gathered, local.to(dev))
    return [float(g) for g in gathered]


def check_in_sync(module: torch.nn.Module, what: str) -> list[float]:
    """Raise if the model replicas differ across ranks (a wrong DP update would follow)."""
    digests = parameter_digests(module)
    if len(set(digests)) > 1:
        raise RuntimeError(f"{what}: model replicas differ across ranks (parameter checksums {digests}); stopping")
    return digests


def broadcast_int(value: int) -> int:
    """Rank 0's `value` on every rank (e.g. a secret seed: sent over the process group, never
    written anywhere); the value itself without a process group."""
    if not world().distributed:
        return int(value)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.broadcast(t, 0)
    return int(t.item())


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and floating-point buffers (batch-norm running statistics) to every
    rank (for non-private parts updated per rank, e.g. a GAN generator)."""
    if world().distributed:
        with torch.no_grad():
            for t in [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]:
                dist.broadcast(t.data, 0)
