"""The train/validation split of a search and its per-epoch, seeded batch order."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler


def split_indices(n: int, train_portion: float, seed: int) -> tuple[list[int], list[int]]:
    """Split ``range(n)`` into the weights' half and the architecture's half.

    The indices are shuffled first, by ``seed``: folder datasets list their
    images class by class, and an unshuffled split would separate classes.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(round(n * train_portion))
    if cut < 1 or cut >= n:
        raise ValueError(f"train portion {train_portion} of {n} images leaves one side of the split empty")
    return order[:cut], order[cut:]


class EpochShardSampler(Sampler[int]):
    """This rank's share of ``indices`` in an order fixed by (seed, epoch).

    Every rank draws the same permutation and takes every world_size-th item,
    so the order depends on nothing but the seed and the epoch; a resumed run
    sees exactly the batches an uninterrupted run would. The permutation is
    padded by wrapping so every rank gets the same number of samples.
    """

    def __init__(self, indices, seed: int, epoch: int, rank: int = 0, world_size: int = 1):
        self.indices = list(indices)
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.per_rank = -(-len(self.indices) // world_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.indices), generator=g).tolist()
        order += order[: self.per_rank * self.world_size - len(order)]
        return iter([self.indices[i] for i in order[self.rank :: self.world_size]])

    def __len__(self) -> int:
        return self.per_rank


def epoch_loader(
    dataset,
    indices,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches of ``dataset[indices]`` for one epoch on one rank; ``batch_size`` is per rank."""
    sampler = EpochShardSampler(indices, seed, epoch, rank, world_size)
    # A seeded generator fixes the workers' seeds too, so augmentation in workers repeats.
    generator = torch.Generator().manual_seed(seed * 7919 + epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        # A last batch of one image would break batch norm; dropping it is harmless.
        drop_last=True,
        generator=generator,
        persistent_workers=False,
    )
