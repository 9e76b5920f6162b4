"""Training on several processes (GPUs, nodes) with PyTorch's own launcher, ``torchrun``.

``torchrun --nproc_per_node=N -m alphaearth_height.cli train ...`` sets RANK, WORLD_SIZE and
LOCAL_RANK; each process joins the group here (NCCL with CUDA, gloo on CPUs), trains its
share under DistributedDataParallel and rank 0 alone writes the run folder.

The global batch of a step is ``batch_size x accumulate x world`` patches, drawn in one
sequence from the run's seeded generator on every rank; rank r takes micro-batches
``r * accumulate ...``. So N processes follow the same loss curve as one process with
``accumulate x N`` (gradient averaging equals the accumulated mean; batch norm sees one
micro-batch either way), up to floating-point summation order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Group:
    """This process's place in the run: rank among ``world`` processes, GPU index on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def leader(self) -> bool:
        """Rank 0: it writes the run folder, checkpoints, model and evaluation."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Group()


def join(device: str) -> Group:
    """The group from torchrun's environment (a single process without it); joins it once."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    group = Group(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        cuda = device in ("auto", "cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(group.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return group


def device_name(group: Group, device: str) -> str:
    """The device this rank trains on: its own GPU on a node with several."""
    import torch

    if group.active and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{group.local_rank}"
    return device


def barrier(group: Group) -> None:
    if group.active:
        import torch.distributed as dist

        dist.barrier()


def summed(group: Group, *values: float) -> list[float]:
    """Sums of the values over every rank (themselves with a single process)."""
    if not group.active:
        return list(values)
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def leave(group: Optional[Group]) -> None:
    """Leave the group at the end of a run (the launcher starts one run a process)."""
    if group is not None and group.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
