"""Data parallelism across processes with PyTorch's own torch.distributed (launched by `torchrun`).

Every process holds the whole teacher and a share of the calibration sequences: each global batch is
split across ranks, each rank computes the loss of its part weighted by its share of the rows, and the
factor gradients are summed with all-reduce before every optimiser step. The gradient is then exactly the
single-process gradient of the whole batch, every rank takes the same step, and the factors stay equal
everywhere, while activations and compute are divided by the number of processes. Rank 0 plans, writes
the run folder and events, evaluates and exports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Parallel:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns the tensor."""
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def sum_values(self, *values: float, device: torch.device | None = None) -> list[float]:
        """Python numbers summed over ranks (one collective for all of them)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        return self.all_reduce(tensor).tolist()

    def any(self, flag: bool, device: torch.device | None = None) -> bool:
        """True on every rank when it is true on any (a stop requested in one process stops them all)."""
        return self.sum_values(float(flag), device=device)[0] > 0

    def broadcast_object(self, obj):
        """Rank 0's object on every rank (any picklable value)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite each tensor with rank 0's values."""
        if self.enabled:
            import torch.distributed as dist

            for tensor in tensors:
                dist.broadcast(tensor.data, src=0)

    def finish(self) -> None:
        """Wait for every process, then close the group. A gloo process that exits with its group still open
        can abort at exit ("terminate called without an active exception") and fail the whole torchrun."""
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()

    def shard(self, batches: list[slice]) -> tuple[torch.Tensor, list[slice], list[int]]:
        """This rank's part of every global batch: (indices of its sequences, its batches as slices of
        those, the global row count of each batch). A part may be empty; the rank then still takes part
        in every collective."""
        indices, local, totals, position = [], [], [], 0
        for rows in batches:
            total = rows.stop - rows.start
            start = rows.start + total * self.rank // self.world_size
            stop = rows.start + total * (self.rank + 1) // self.world_size
            indices.extend(range(start, stop))
            local.append(slice(position, position + stop - start))
            totals.append(total)
            position += stop - start
        return torch.tensor(indices, dtype=torch.long), local, totals


SINGLE = Parallel()


def from_environment() -> Parallel:
    """The process group `torchrun` describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*),
    initialised on first use: NCCL when this process has a GPU, else gloo. One process without torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Parallel(dist.get_rank(), dist.get_world_size(), local_rank)


def device_for(parallel: Parallel, requested: str) -> str:
    """Each process takes its own GPU: "auto" or "cuda" become cuda:LOCAL_RANK under torchrun."""
    if parallel.enabled and requested in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{parallel.local_rank}"
    return requested
