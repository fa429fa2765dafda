"""Image classification datasets read from local files; nothing is downloaded.

``load_dataset(name, root, image_size, fraction, seed)`` returns
``(train_set, test_set, info)``. Every set yields ``(image, label)``: a float32
CHW tensor normalised per channel, and an int. ``info`` holds num_classes,
in_channels, image_size (and the class names where known). Every set's
``mean`` and ``std`` (C, 1, 1) are the statistics it normalised with, so the
normalised value of a black pixel is ``-mean / std``.
"""

from __future__ import annotations

import copy
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

DATASETS = ("digits", "cifar10", "cifar100", "imagenet")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPEG", ".JPG", ".PNG")

_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# The digits split never changes with `seed`, so results stay comparable across runs.
_DIGITS_SPLIT_SEED = 0
_DIGITS_TEST_FRACTION = 0.2


class DatasetError(ValueError):
    """A dataset is malformed or was asked for with bad arguments."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset's files are not where they were expected."""


class TensorImageDataset(Dataset):
    """Images held in memory as uint8 (N, C, H, W), normalised and resized on access."""

    def __init__(self, images: torch.Tensor, labels: Sequence[int], mean, std, image_size: int | None = None):
        self.images = images
        self.labels = [int(y) for y in labels]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].float().div_(255.0)
        if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x[None], size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)[0]
        return (x - self.mean) / self.std, self.labels[i]


class FloatImageDataset(Dataset):
    """Images already decoded to normalised float (N, C, H, W), with the ``mean`` and ``std`` of that."""

    def __init__(self, images: torch.Tensor, labels: Sequence[int], mean=0.0, std=1.0):
        self.images = images
        self.labels = [int(y) for y in labels]
        channels = images.shape[1]
        self.mean = torch.as_tensor(mean, dtype=torch.float32).expand(channels).reshape(channels, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).expand(channels).reshape(channels, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], self.labels[i]


class ImageFolderDataset(Dataset):
    """Files decoded with Pillow on access: shorter side resized to ``image_size / 0.875``, centre crop.

    Indexed by ``(i, key)`` instead of ``i`` (the search's samplers do so, see
    ``takes_sample_keys``), an image gets a random resized crop and horizontal flip chosen by
    ``key`` (``fastnas.data.pipeline.random_crop_box``), resized to ``image_size``: the same
    augmentation for the same key, in any worker.

    With ``transform`` set, the decoded image (uint8 CHW tensor, whole) goes
    through it instead of the resize and crop, before normalisation: training
    augmentation that works on pixels, such as random resized crops and colour
    jitter. It must return ``image_size`` x ``image_size``.

    ``encoded()`` gives a view for decoding on the GPU (``fastnas.data.pipeline``): items are
    ``(file bytes, crop box, label, path)``, the crop chosen from the file's header alone.

    A file that cannot be decoded raises DatasetError naming it: a search stops rather than
    train on a silently smaller set.
    """

    takes_sample_keys = True

    def __init__(self, samples: list[tuple[Path, int]], image_size: int, mean, std, transform=None):
        self.samples = samples
        self.labels = [y for _, y in samples]
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.transform = transform
        self.is_encoded = False

    def __len__(self) -> int:
        return len(self.samples)

    def encoded(self) -> ImageFolderDataset:
        """The same images, each read as its encoded bytes and a crop box (GPU decoding)."""
        view = copy.copy(self)
        view.is_encoded = True
        return view

    def __getitem__(self, item) -> tuple[torch.Tensor, int]:
        from PIL import Image

        from fastnas.data.pipeline import centre_crop_box, random_crop_box

        i, key = item if isinstance(item, tuple) else (item, None)
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                box = random_crop_box(*im.size, key) if key is not None else None
                if self.is_encoded:
                    box = box or centre_crop_box(*im.size)
                    if im.format == "JPEG":
                        data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
                    else:
                        data = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
                    return data, (*box[:4], int(box[4])), label, str(path)
                im = im.convert("RGB")
                if self.transform is not None:
                    whole = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
                    x = self.transform(whole).float().div_(255.0)
                    return (x - self.mean) / self.std, label
                if box is not None:
                    left, top, w, h, flip = box
                    size = (self.image_size, self.image_size)
                    im = im.resize(size, Image.BILINEAR, box=(left, top, left + w, top + h))
                    if flip:
                        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
                    return (x - self.mean) / self.std, label
                w, h = im.size
                short = max(self.image_size, round(self.image_size / 0.875))
                scale = short / min(w, h)
                im = im.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BILINEAR)
                w, h = im.size
                left, top = (w - self.image_size) // 2, (h - self.image_size) // 2
                im = im.crop((left, top, left + self.image_size, top + self.image_size))
                array = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"cannot decode image {path}: {exc}") from None
        x = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self.mean) / self.std, label


def _per_class_subset(labels: Sequence[int], fraction: float | None, seed: int) -> list[int]:
    """Indices of ``fraction`` of each class (at least one), the same for the same seed."""
    if fraction is None:
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    keep = []
    for y in sorted(by_class):
        idx = by_class[y]
        n = max(1, int(round(fraction * len(idx))))
        keep += [idx[k] for k in sorted(rng.choice(len(idx), size=n, replace=False))]
    return sorted(keep)


def _check_fraction(fraction: float | None) -> None:
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise DatasetError(f"fraction must be in (0, 1], got {fraction}")


# --- digits ---------------------------------------------------------------------------


def _load_digits(image_size: int | None, fraction: float | None, seed: int):
    from sklearn.datasets import load_digits

    size = image_size or 16
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).div_(16.0)[:, None]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    # Three identical channels, so the RGB stems of the search spaces apply unchanged.
    images = images.expand(-1, 3, -1, -1)
    labels = digits.target.tolist()
    order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(labels))
    n_test = int(round(_DIGITS_TEST_FRACTION * len(labels)))
    test_idx, train_idx = sorted(order[:n_test]), sorted(order[n_test:])
    train_labels = [labels[i] for i in train_idx]
    train_idx = [train_idx[k] for k in _per_class_subset(train_labels, fraction, seed)]
    mean = images[train_idx].mean()
    std = images[train_idx].std()
    images = ((images - mean) / std).contiguous()
    train = FloatImageDataset(images[train_idx], [labels[i] for i in train_idx], mean, std)
    test = FloatImageDataset(images[test_idx], [labels[i] for i in test_idx], mean, std)
    info = {"num_classes": 10, "in_channels": 3, "image_size": size, "classes": [str(c) for c in range(10)]}
    return train, test, info


# --- CIFAR ----------------------------------------------------------------------------

_CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)],
                    test=["test_batch"], label_key="labels", classes=10, stats=_CIFAR10_STATS),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test=["test"],
                     label_key="fine_labels", classes=100, stats=_CIFAR100_STATS),
}  # fmt: skip


def _cifar_folder(name: str, root) -> Path:
    spec = _CIFAR[name]
    if root is None:
        raise DatasetNotFoundError(
            f"{name} is read from a local folder; pass root= the '{spec['folder']}' folder (or its parent)"
        )
    root = Path(root).expanduser()
    for folder in (root, root / spec["folder"]):
        if all((folder / f).is_file() for f in spec["train"] + spec["test"]):
            return folder
    files = ", ".join(spec["train"] + spec["test"])
    raise DatasetNotFoundError(
        f"{name}: expected the python-pickle files {files} in {root} or in {root / spec['folder']}; "
        f"found {sorted(p.name for p in root.iterdir()) if root.is_dir() else 'no such folder'}"
    )


# What the CIFAR python-pickle files hold, besides dicts, lists, ints and bytes: numpy
# arrays (rebuilt through these functions, named as numpy 1 and numpy 2 pickle them)
# and, in files pickled with protocol 2 by Python 3, bytes rebuilt by _codecs.encode.
_CIFAR_PICKLE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Loads only what a CIFAR file holds: a crafted file cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(
                f"it refers to {module}.{name}, which a CIFAR file never holds; refusing to load it"
            )
        return super().find_class(module, name)


def _read_cifar_file(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, list[int]]:
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as exc:
        raise DatasetError(f"{path} is not a CIFAR python-pickle file: {type(exc).__name__}: {exc}") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(batch).__name__}")

    def get(key: str):
        for k in (key.encode(), key):
            if k in batch:
                return batch[k]
        raise DatasetError(f"{path}: no '{key}' entry; found keys {sorted(map(str, batch))}")

    data = np.asarray(get("data"))
    labels = [int(y) for y in get(label_key)]
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if len(labels) != data.shape[0]:
        raise DatasetError(f"{path}: {data.shape[0]} images but {len(labels)} labels")
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise DatasetError(f"{path}: label {bad[0]} outside 0..{num_classes - 1}")
    return data, labels


def _load_cifar(name: str, root, image_size: int | None, fraction: float | None, seed: int):
    spec = _CIFAR[name]
    folder = _cifar_folder(name, root)
    sets = []
    for split in ("train", "test"):
        parts = [_read_cifar_file(folder / f, spec["label_key"], spec["classes"]) for f in spec[split]]
        data = np.concatenate([d for d, _ in parts])
        labels = [y for _, ys in parts for y in ys]
        if split == "train":
            keep = _per_class_subset(labels, fraction, seed)
            data, labels = data[keep], [labels[i] for i in keep]
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
        sets.append(TensorImageDataset(images, labels, *spec["stats"], image_size=image_size))
    info = {"num_classes": spec["classes"], "in_channels": 3, "image_size": image_size or 32}
    return sets[0], sets[1], info


# --- ImageNet-style folder ------------------------------------------------------------


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir())


def _folder_samples(split_dir: Path, classes: list[str]) -> list[tuple[Path, int]]:
    samples = []
    for label, cls in enumerate(classes):
        cls_dir = split_dir / cls
        if not cls_dir.is_dir():
            continue
        files = sorted(p for p in cls_dir.iterdir() if p.is_file() and p.suffix in IMAGE_EXTENSIONS)
        samples += [(p, label) for p in files]
    return samples


def _load_image_folder(root, image_size: int | None, fraction: float | None, seed: int):
    if root is None:
        raise DatasetNotFoundError("imagenet is read from a local folder; pass root= a folder holding train/ and val/")
    root = Path(root).expanduser()
    train_dir, val_dir = root / "train", root / "val"
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise DatasetNotFoundError(
                f"imagenet: expected {d} with one sub-folder of .jpg/.png images per class "
                f"(root/train/<class>/*.jpg and root/val/<class>/*.jpg)"
            )
    classes = _class_folders(train_dir)
    if not classes:
        raise DatasetError(f"imagenet: {train_dir} has no class sub-folders")
    unknown = sorted(set(_class_folders(val_dir)) - set(classes))
    if unknown:
        raise DatasetError(f"imagenet: {val_dir} has classes not in {train_dir}: {unknown[:5]}")
    train_samples = _folder_samples(train_dir, classes)
    empty = sorted(set(classes) - {classes[y] for _, y in train_samples})
    if empty:
        raise DatasetError(f"imagenet: no .jpg/.png images in {[str(train_dir / c) for c in empty[:5]]}")
    val_samples = _folder_samples(val_dir, classes)
    if not val_samples:
        raise DatasetError(f"imagenet: no .jpg/.png images under {val_dir}/<class>/")
    keep = _per_class_subset([y for _, y in train_samples], fraction, seed)
    train_samples = [train_samples[i] for i in keep]
    size = image_size or 224
    train = ImageFolderDataset(train_samples, size, *_IMAGENET_STATS)
    test = ImageFolderDataset(val_samples, size, *_IMAGENET_STATS)
    info = {"num_classes": len(classes), "in_channels": 3, "image_size": size, "classes": classes}
    return train, test, info


def info_field(info, key: str):
    """A field of a dataset's info (``num_classes``, ``in_channels``, ``image_size``): a dict,
    as ``load_dataset`` gives, or an object with attributes."""
    return info[key] if isinstance(info, dict) else getattr(info, key)


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    image_size: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> tuple[Dataset, Dataset, dict]:
    """Load a dataset from local files: ``(train_set, test_set, info)``.

    Args:
        name: "digits" (scikit-learn's bundled 8x8 digits, upscaled bilinearly
            to ``image_size``, default 16, with the grey level copied into 3
            channels; a fixed 80/20 train/test split), "cifar10", "cifar100"
            (python-pickle files; ``root`` is their folder or its parent) or
            "imagenet" (``root/train/<class>/*`` and ``root/val/<class>/*``,
            JPEG or PNG, resized and centre-cropped to ``image_size``, default 224).
        root: where the files are (unused for digits).
        image_size: side of the returned square images.
        fraction: keep this fraction of each class of the training set (at
            least one image per class), chosen by ``seed``; the test set is whole.
        seed: seed of the ``fraction`` subsample.

    Raises:
        DatasetNotFoundError (a DatasetError and a FileNotFoundError): files missing.
        DatasetError (a ValueError): malformed files or bad arguments.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    _check_fraction(fraction)
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise DatasetError(f"image_size must be a positive int, got {image_size!r}")
    if name == "digits":
        return _load_digits(image_size, fraction, seed)
    if name in _CIFAR:
        return _load_cifar(name, root, image_size, fraction, seed)
    return _load_image_folder(root, image_size, fraction, seed)
