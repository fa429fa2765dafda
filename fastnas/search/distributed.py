"""Process-group setup under torchrun and the collectives a searcher needs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistributedContext:
    """Where this process sits: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_mean_(self, tensors) -> None:
        """Average ``tensors`` in place over all ranks, in one flat all-reduce."""
        tensors = [t for t in tensors if t is not None]
        if not self.enabled or not tensors:
            return
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The sum of ``values`` over all ranks, on the device ``values`` came from."""
        if self.enabled:
            # NCCL reduces only GPU tensors.
            summed = values.to(self.device, copy=True)
            dist.all_reduce(summed)
            values = summed.to(values.device)
        return values

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str) -> DistributedContext:
    """Join the process group that torchrun describes in the environment, if any.

    NCCL on GPUs, gloo on CPUs. Without torchrun this is a single process.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            from fastnas.search.errors import SearchError

            raise SearchError("--device cuda was requested but torch sees no CUDA GPU; use --device cpu")
        dev = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    ctx = DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        ctx.initialized_here = True
    return ctx
