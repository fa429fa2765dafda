"""The train/validation split of a search, its per-epoch, seeded batch order and its loaders."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Sampler

from fastnas.data.pipeline import sample_key

# Batches each worker keeps ready (DataLoader's prefetch_factor): enough to ride out a slow
# file or a large JPEG without holding many batches of 224x224 images in memory.
PREFETCH_BATCHES = 4
# Workers per rank for an image folder, at most: past this a rank's decoding keeps up with a GPU's step.
MAX_WORKERS = 12


def split_indices(n: int, train_portion: float, seed: int, labels=None) -> tuple[list[int], list[int]]:
    """Split ``range(n)`` into the weights' half and the architecture's half.

    The indices are shuffled first, by ``seed``: folder datasets list their
    images class by class, and an unshuffled split would separate classes.
    With ``labels``, each class is split on its own (``train_portion`` of it, at least one
    image on each side where the class has two), as PC-DARTS' per-class ImageNet subsets.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    if labels is not None:
        by_class: dict[int, list[int]] = {}
        for i in order:
            by_class.setdefault(int(labels[i]), []).append(i)
        train, val = [], []
        for members in by_class.values():
            cut = int(round(len(members) * train_portion))
            if len(members) > 1:
                cut = min(max(cut, 1), len(members) - 1)
            train += members[:cut]
            val += members[cut:]
        if not train or not val:
            raise ValueError(f"train portion {train_portion} of {n} images leaves one side of the split empty")
        return sorted(train), sorted(val)
    cut = int(round(n * train_portion))
    if cut < 1 or cut >= n:
        raise ValueError(f"train portion {train_portion} of {n} images leaves one side of the split empty")
    return order[:cut], order[cut:]


def search_split(train_set, config) -> tuple[list[int], list[int]]:
    """The weights' and the architecture's halves of a search: per class on an image folder
    (PC-DARTS' ImageNet subsets), else a shuffled split of the whole set."""
    from fastnas.errors import SearchError

    labels = getattr(train_set, "labels", None) if config.dataset == "imagenet" else None
    try:
        return split_indices(len(train_set), config.train_portion, config.seed, labels)
    except ValueError as exc:
        raise SearchError(f"{exc}; keep more images (--fraction) or another --train-portion") from None


def default_workers(dataset: str, world_size: int = 1) -> int:
    """Data-loader workers per rank: none for data held in memory (a worker would only copy
    tensors), else the cores less one for the training loop, shared by the ranks of a node."""
    if dataset != "imagenet":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return max(1, min(MAX_WORKERS, cores // max(1, local) - 1))


class EpochShardSampler(Sampler[int]):
    """This rank's share of ``indices`` in an order fixed by (seed, epoch).

    Every rank draws the same permutation and takes every world_size-th item,
    so the order depends on nothing but the seed and the epoch; a resumed run
    sees exactly the batches an uninterrupted run would. The permutation is
    padded by wrapping so every rank gets the same number of samples.

    With ``keys``, it yields ``(index, augmentation key)`` pairs (``sample_key`` of seed,
    epoch, pass and index), for datasets that take them (``takes_sample_keys``). ``repeat``
    numbers the passes over the same indices within an epoch (a shorter architecture half
    cycles), each in its own order.
    """

    def __init__(
        self, indices, seed: int, epoch: int, rank: int = 0, world_size: int = 1, keys: bool = False, repeat: int = 0
    ):
        self.indices = list(indices)
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.keys, self.repeat = keys, repeat
        self.per_rank = -(-len(self.indices) // world_size)

    def set_epoch(self, epoch: int, repeat: int = 0) -> None:
        """Order the next iteration as pass ``repeat`` of ``epoch`` (in the main process, so a
        DataLoader's persistent workers need not know)."""
        self.epoch, self.repeat = epoch, repeat

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + self.repeat * 7_919_993)
        order = torch.randperm(len(self.indices), generator=g).tolist()
        order += order[: self.per_rank * self.world_size - len(order)]
        mine = [self.indices[i] for i in order[self.rank :: self.world_size]]
        if self.keys:
            return iter([(i, sample_key(self.seed, self.epoch, self.repeat, i)) for i in mine])
        return iter(mine)

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


class SearchLoader:
    """One half of a search's split, batched for one rank, with the same DataLoader (and its
    worker processes) for every epoch: ``batches(epoch)`` is one pass in that epoch's order,
    ``cycle(epoch)`` pass after pass, each in its own order.

    Workers (``workers`` > 0) decode and augment ahead of the step, ``PREFETCH_BATCHES`` each,
    and stay alive between epochs; pinned memory (``pin_memory``, on CUDA) lets the copy to
    the device overlap the step. With ``decode`` "cuda" or "dali" the workers only read the
    files, and the GPU decodes (``fastnas.data.pipeline.DecodedBatches``). Augmentation keys
    come from the sampler, so batches do not depend on the workers.
    """

    def __init__(
        self,
        dataset,
        indices,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        pin_memory: bool = False,
        augment: bool = True,
        decode: str = "cpu",
        device=None,
    ):
        from fastnas.data.pipeline import DecodedBatches, collate_encoded

        keys = augment and getattr(dataset, "takes_sample_keys", False)
        self.sampler = EpochShardSampler(indices, seed, 0, rank, world_size, keys=keys)
        self.batch_size = batch_size
        encoded = decode != "cpu"
        self.loader = DataLoader(
            dataset.encoded() if encoded else dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=workers,
            pin_memory=pin_memory and not encoded,
            # A last batch of one image would break batch norm; dropping it is harmless.
            drop_last=True,
            collate_fn=collate_encoded if encoded else None,
            persistent_workers=workers > 0,
            prefetch_factor=PREFETCH_BATCHES if workers > 0 else None,
            generator=torch.Generator().manual_seed(seed),
        )
        self.source = self.loader
        if encoded:
            self.source = DecodedBatches(
                self.loader, dataset.image_size, dataset.mean.flatten(), dataset.std.flatten(), device, decode
            )

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def batches(self, epoch: int, repeat: int = 0):
        self.sampler.set_epoch(epoch, repeat)
        return iter(self.source)

    def cycle(self, epoch: int):
        repeat = 0
        while True:
            yield from self.batches(epoch, repeat)
            repeat += 1
