"""Process-group plumbing for ``torchrun``: one process per GPU (NCCL) or per CPU worker (gloo).

Under ``torchrun --nproc_per_node K``, each rank trains on a contiguous ``1/K`` slice of the
same global batch and DDP averages the gradients, so the run equals the single-process run
with the same ``--batch-size`` (up to float round-off). Only rank 0 writes files.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from .._errors import InputError

__all__ = ["Dist", "setup", "teardown"]


@dataclass(frozen=True)
class Dist:
    """Where this process sits: ``rank`` of ``world`` processes, on ``device``."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """True on the process that writes files and logs."""
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """The contiguous slice, for this rank, of a global batch (first dimension)."""
        if self.world == 1:
            return batch
        per = batch.shape[0] // self.world
        return batch[self.rank * per : (self.rank + 1) * per]

    def mean(self, value: torch.Tensor) -> float:
        """Mean of a scalar over ranks (every rank gets the same number)."""
        if self.world == 1:
            return float(value.detach())
        v = value.detach().float().reshape(1).clone()
        torch.distributed.all_reduce(v)
        return float(v) / self.world

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.world > 1:
            torch.distributed.barrier()

    def from_main(self, fn):
        """``fn()`` run on rank 0 alone, its result (or its :class:`InputError`) handed to every rank.

        On GPUs the result travels over a gloo group: through host memory, not the GPU's, and
        with a one-hour timeout instead of NCCL's ten minutes while rank 0 works (e.g. tokenizes).
        """
        if self.world == 1:
            return fn()
        group = None
        if self.device.type == "cuda":
            group = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(hours=1))
        try:
            box = [None]
            if self.main:
                try:
                    box[0] = fn()
                except InputError as err:
                    box[0] = err
            torch.distributed.broadcast_object_list(box, src=0, group=group)
        finally:
            if group is not None:
                torch.distributed.destroy_process_group(group)
        if isinstance(box[0], InputError):
            raise box[0]
        return box[0]

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``DistributedDataParallel`` around ``model`` when there is more than one rank."""
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)


def setup(cuda: bool | None = None) -> Dist:
    """Join the ``torchrun`` process group if ``WORLD_SIZE > 1``; pick this rank's device.

    Args:
        cuda: one GPU per process (NCCL) or CPU processes (gloo); default: CUDA when available.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if world == 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        _check_devices(local, int(os.environ.get("LOCAL_WORLD_SIZE", str(local + 1))))
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(rank=torch.distributed.get_rank(), world=world, device=device)


def _check_devices(local_rank: int, local_world: int) -> None:
    """Refuse more processes on this node than visible GPUs (instead of "invalid device ordinal")."""
    n = torch.cuda.device_count()
    if max(local_rank + 1, local_world) > n:
        raise InputError(
            f"torchrun started {max(local_rank + 1, local_world)} processes on this node but {n} GPU(s) "
            f'are visible: use --nproc_per_node {n} or fewer, or CUDA_VISIBLE_DEVICES="" for CPU (gloo) '
            "processes"
        )


def teardown() -> None:
    """Leave the process group (``destroy_process_group``) if this process joined one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
