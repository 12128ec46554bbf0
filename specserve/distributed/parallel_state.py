"""The tensor-parallel group of one model replica.

With ``tp_size == 1`` nothing is initialised and every collective is the identity, so the model
code has one path for both cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallelGroup:
    """Rank and size of this process in its TP group, plus the process groups it uses."""

    rank: int = 0
    size: int = 1
    device_group: dist.ProcessGroup | None = None  # carries activations (NCCL on GPU)
    cpu_group: dist.ProcessGroup | None = None  # carries control messages (always gloo)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(tensor, group=self.device_group)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along the last dimension."""
        if self.size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.device_group)
        return torch.cat(parts, dim=-1)

    def broadcast_object(self, obj: object = None) -> object:
        """Send ``obj`` from rank 0 to every rank; every rank returns rank 0's object."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]


SINGLE_PROCESS = TensorParallelGroup()
_NO_LIMIT = timedelta(days=365)  # torch's default is 30 minutes: an idle worker would give up


def init_tensor_parallel(
    rank: int, size: int, init_method: str, device: torch.device, timeout_s: float | None = None
) -> TensorParallelGroup:
    """Join the TP group (gloo on CPU, NCCL on CUDA) and return it.

    ``timeout_s`` bounds every wait of this rank in a collective (None: no limit). The limit is
    local to the process: rank 0 sets one so that a dead peer fails the step instead of hanging
    it, while workers, idle until rank 0's next call, wait without one.
    """
    if size == 1:
        return SINGLE_PROCESS
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = _NO_LIMIT if timeout_s is None else timedelta(seconds=timeout_s)
    # Joining may take as long as the slowest rank's start-up (torch's default limit); the
    # groups the collectives run on then carry this rank's own limit.
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size)
    device_group = dist.new_group(backend=backend, timeout=timeout)
    cpu_group = device_group if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    return TensorParallelGroup(rank, size, device_group, cpu_group)


def destroy_tensor_parallel(group: TensorParallelGroup) -> None:
    if group.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
