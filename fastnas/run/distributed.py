"""Process-group setup under torchrun and the collectives a searcher needs."""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass

import numpy as np
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

    def check_same(self, what: str, value: str) -> None:
        """Raise SearchError on every rank unless all ranks hold the same ``value`` (a short
        string, such as a hash); ``what`` names it in the message."""
        if not self.enabled:
            return
        seen = [None] * self.world_size
        dist.all_gather_object(seen, (socket.gethostname(), value))
        odd = [r for r, (_host, v) in enumerate(seen) if v != seen[0][1]]
        if odd:
            from fastnas.errors import SearchError

            where = ", ".join(f"rank {r} on {seen[r][0]}" for r in odd)
            raise SearchError(
                f"{what} differs between the processes: {where} against rank 0 on {seen[0][0]}; "
                "every node needs the same data at --data (and the same --fraction and --seed)"
            )

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
            from fastnas.errors import SearchError

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


def data_fingerprint(dataset, *index_lists) -> str:
    """A hash of what a search reads: the images (an image folder's files by class folder and
    name, in-memory images by their bytes), the labels and ``index_lists`` (the split).

    Every rank loads the data and draws the split itself; on several nodes a different copy
    of the data, or another fraction of it, would otherwise go unnoticed.
    """
    h = hashlib.sha256(str(len(dataset)).encode())
    for idx in index_lists:
        h.update(b"|" + np.asarray(idx, dtype=np.int64).tobytes())
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        # The folder's own path may differ between nodes; what it holds may not.
        names = (f"{os.path.basename(os.path.dirname(p))}/{os.path.basename(p)}:{y}" for p, y in samples)
        h.update("\n".join(names).encode())
        return h.hexdigest()
    tensors = list(getattr(dataset, "tensors", ())) + [getattr(dataset, "images", None)]
    for t in tensors:
        if isinstance(t, torch.Tensor):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()
