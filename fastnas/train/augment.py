"""Training augmentation, with torchvision's transforms v2 on tensors, and DARTS' cutout.

torchvision is imported here only, so that ``import fastnas`` and searches never need it.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class Cutout:
    """Zero a ``length`` x ``length`` square of a CHW image, centred anywhere, clipped at the borders.

    DARTS' ``utils.Cutout`` (DeVries and Taylor, 2017), applied with probability
    1 after normalisation: the centre is uniform over the pixels and the square
    spans ``[c - length // 2, c + length // 2)`` on each axis, so near a border
    less than ``length**2`` pixels go. torchvision's ``RandomErasing`` keeps its
    rectangles inside the image, which is another distribution. The centre is
    drawn from torch's global generator (a run's checkpoint restores it).
    """

    def __init__(self, length: int):
        if length < 1:
            raise ValueError(f"cutout length must be positive, got {length}")
        self.length = length

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        y, x = int(torch.randint(h, ())), int(torch.randint(w, ()))
        return cutout_at(image, y, x, self.length)

    def __repr__(self) -> str:
        return f"Cutout(length={self.length})"


def cutout_at(image: torch.Tensor, y: int, x: int, length: int) -> torch.Tensor:
    """``image`` with the square of side ``length`` centred at (y, x) zeroed, clipped at the borders."""
    h, w = image.shape[-2:]
    half = length // 2
    y0, y1 = min(max(y - half, 0), h), min(max(y + half, 0), h)
    x0, x1 = min(max(x - half, 0), w), min(max(x + half, 0), w)
    out = image.clone()
    out[..., y0:y1, x0:x1] = 0
    return out


def tensor_augmentation(size: int, padding: int, flip: bool, cutout: int, fill: list[float]):
    """Random crop (zero-pixel padding), horizontal flip and cutout of a normalised CHW tensor, as DARTS' CIFAR.

    ``fill`` is the normalised value of a black pixel per channel, what the
    padding of the unnormalised image would have been.
    """
    from torchvision.transforms import v2

    steps = []
    if padding:
        steps.append(v2.RandomCrop(size, padding=padding, fill=fill))
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    if cutout:
        steps.append(Cutout(cutout))
    return v2.Compose(steps) if steps else v2.Identity()


def imagenet_augmentation(size: int):
    """DARTS' ImageNet training transform on a whole uint8 CHW image: random resized crop, flip, colour jitter."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop(size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2),
        ]
    )


class AugmentedDataset(Dataset):
    """``dataset``'s (image, label) pairs with ``transform`` applied to the image."""

    def __init__(self, dataset: Dataset, transform):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        return self.transform(image), label


def black_pixel(dataset: Dataset, channels: int) -> list[float]:
    """The normalised value of a zero pixel in ``dataset``, per channel (0 when it does not say its statistics)."""
    mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
    if mean is None or std is None:
        return [0.0] * channels
    return (-torch.as_tensor(mean) / torch.as_tensor(std)).flatten().tolist()


def augment_training_set(dataset: Dataset, config, image_size: int, channels: int) -> Dataset:
    """The training set of ``config`` with its augmentation."""
    if config.imagenet_augment:
        from fastnas.data.datasets import ImageFolderDataset

        if not isinstance(dataset, ImageFolderDataset):
            raise ValueError("ImageNet augmentation crops whole decoded images; it needs an image-folder dataset")
        dataset.transform = imagenet_augmentation(image_size)
        return dataset
    transform = tensor_augmentation(
        image_size, config.crop_padding, config.flip, config.cutout, black_pixel(dataset, channels)
    )
    return AugmentedDataset(dataset, transform)
