"""A search across processes on torch.distributed (torchrun, accelerate launch).

Every rank holds the whole model and the whole search state. Each step, every rank draws the
same K masks from its own generator seeded with the run's seed (so the union of the ranks' work
is exactly one process's draw, whatever the world size), computes the losses of its share of the
K x B (mask, sequence) pairs, and one all-reduce of the (K, B) loss table gives every rank all
the losses: each then takes the same update, so the probabilities stay identical on every rank
and equal those of one process drawing all K samples. Only rank 0 writes (checkpoints, status,
the saved model).

gloo on CPU, NCCL on CUDA (one device per rank: cuda:LOCAL_RANK). The launchers set RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them a run is one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import PrunerError


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks of a run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes."""
        return self.rank == 0

    def share(self, n: int) -> range:
        """This rank's contiguous share of n work items: [n r / W, n (r + 1) / W)."""
        return range(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def sum(self, t: Tensor) -> Tensor:
        """The elementwise sum of `t` over all ranks (a copy on t's device; `t` itself when alone)."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        work = t.cuda() if self.backend == "nccl" else t.clone()
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to(t.device)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def launched() -> bool:
    """True when a launcher started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def current() -> Group:
    """The group of the initialised default process group, else a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return Group()
    return Group(dist.get_rank(), dist.get_world_size(), dist.get_backend())


def init_from_env(device: torch.device) -> Group:
    """Join the launcher's process group (NCCL for a CUDA device, else gloo); a single process
    when no launcher set WORLD_SIZE > 1. Idempotent."""
    import torch.distributed as dist

    if not launched() or dist.is_initialized():
        return current()
    if not dist.is_available():
        raise PrunerError("this torch build has no torch.distributed: run one process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    return current()


def shutdown() -> None:
    """Leave the process group (at the end of a command)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
