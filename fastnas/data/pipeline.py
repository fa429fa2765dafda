"""Feeding an image folder to a search: augmentation keyed by sample, and who decodes the JPEGs.

Randomness of augmentation comes from a key per sample and epoch (``sample_key``), never
from a worker's random state: the same image gets the same crop in the same epoch with any
number of workers, persistent or not, on any number of ranks, and after a resume.

Decoders (``decode``):

* ``cpu`` (default, always works): Pillow decodes, crops and resizes in the data-loader
  workers; the training loop receives finished float batches.
* ``cuda``: the workers only read each file and its header (size) and choose the crop; the
  main process decodes the batch with ``torchvision.io.decode_jpeg(device="cuda")`` (nvJPEG),
  then crops, resizes, flips and normalises on the GPU. Files that are not JPEG (PNG) are
  decoded by Pillow in the workers instead.
* ``dali``: NVIDIA DALI's decoder (``nvidia.dali``), the same way as ``cuda``; fastnas
  refuses it, naming the package, where DALI is not importable.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

DECODERS = ("cpu", "cuda", "dali")

# RandomResizedCrop's usual ranges (Inception; torchvision's defaults, PC-DARTS' search
# transforms): 8% to 100% of the area, aspect ratio 3/4 to 4/3, ten tries.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_TRIES = 10
# Evaluation: shorter side to size / 0.875, centre crop (256 -> 224).
CENTRE_FRACTION = 0.875


def dali_missing_reason() -> str | None:
    """Why NVIDIA DALI cannot be used here, or None."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"{type(exc).__name__}: {exc}"
    return None


def check_decode(decode: str, dataset: str, device: str) -> None:
    """Raise ValueError for a decoder that cannot run with these settings."""
    if decode not in DECODERS:
        raise ValueError(f"unknown --decode {decode!r}; choose one of {', '.join(DECODERS)}")
    if decode == "cpu":
        return
    if dataset != "imagenet":
        raise ValueError(f"--decode {decode} decodes an image folder's JPEGs; {dataset} is held in memory")
    if not str(device).startswith("cuda"):
        raise ValueError(f"--decode {decode} decodes on the GPU; it needs --device cuda, not {device}")
    if decode == "dali":
        reason = dali_missing_reason()
        if reason:
            raise ValueError(
                "--decode dali needs NVIDIA DALI (the nvidia-dali-cuda120 or -cuda130 package, "
                f"import nvidia.dali), which cannot be imported here ({reason}); use --decode cuda or cpu"
            )


def sample_key(seed: int, epoch: int, repeat: int, index: int) -> int:
    """The augmentation key of image ``index`` in pass ``repeat`` of ``epoch``: a 63-bit int."""
    key = 0x9E3779B97F4A7C15
    for part in (seed, epoch, repeat, index):
        key = (key ^ (part & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 % (1 << 64)
    return key >> 1


def random_crop_box(width: int, height: int, key: int) -> tuple[int, int, int, int, bool]:
    """``(left, top, crop width, crop height, flip)`` of a random resized crop, chosen by ``key``.

    An area of ``CROP_SCALE`` of the image at an aspect ratio log-uniform in ``CROP_RATIO``;
    after ``CROP_TRIES`` misses, the largest centred crop within the ratio range.
    """
    rng = random.Random(key)
    area = width * height
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(CROP_TRIES):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, w, h, rng.random() < 0.5
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif ratio > CROP_RATIO[1]:
        w, h = int(round(height * CROP_RATIO[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h, rng.random() < 0.5


def centre_crop_box(width: int, height: int) -> tuple[int, int, int, int, bool]:
    """The evaluation crop: the centred square of ``CENTRE_FRACTION`` of the shorter side."""
    side = max(1, int(round(min(width, height) * CENTRE_FRACTION)))
    return (width - side) // 2, (height - side) // 2, side, side, False


def collate_encoded(batch):
    """A batch of ``(data, box, label, path)``: the list of data (encoded 1-D bytes or decoded
    CHW uint8), boxes as an (N, 5) int64 tensor, labels as a tensor, the list of paths."""
    data = [item[0] for item in batch]
    boxes = torch.tensor([item[1] for item in batch], dtype=torch.int64)
    labels = torch.tensor([item[2] for item in batch], dtype=torch.int64)
    return data, boxes, labels, [item[3] for item in batch]


def decode_batch(data, boxes, image_size: int, mean, std, device, decoder: str = "cuda", paths=None) -> torch.Tensor:
    """Decode (where encoded), crop, resize, flip and normalise a batch on ``device``:
    a float32 (N, 3, image_size, image_size) tensor. ``decoder`` "cuda" uses
    ``torchvision.io.decode_jpeg`` on ``device``, "dali" NVIDIA DALI's decoder."""
    device = torch.device(device)
    encoded = [i for i, d in enumerate(data) if d.dim() == 1]
    images = list(data)
    if encoded:
        names = [paths[i] if paths else f"image {i} of the batch" for i in encoded]
        decoded = _decode_jpegs([data[i] for i in encoded], device, decoder, names)
        for i, image in zip(encoded, decoded):
            images[i] = image
    mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    out = torch.empty(len(images), 3, image_size, image_size, device=device)
    for n, (image, box) in enumerate(zip(images, boxes.tolist())):
        left, top, w, h, flip = box
        crop = image.to(device, non_blocking=True)[None, :, top : top + h, left : left + w].float()
        crop = F.interpolate(crop, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
        out[n] = crop[0].flip(-1) if flip else crop[0]
    return out.div_(255.0).sub_(mean).div_(std)


def _decode_jpegs(encoded: list[torch.Tensor], device: torch.device, decoder: str, names) -> list[torch.Tensor]:
    if decoder == "dali":
        return _decode_dali(encoded, device)
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        # One bad file fails the whole batched call; decode one by one to name it.
        from fastnas.data.datasets import DatasetError

        out = []
        for data, name in zip(encoded, names):
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as exc:
                raise DatasetError(f"cannot decode image {name}: {str(exc).splitlines()[0]}") from None
        return out


_DALI_PIPES: dict = {}


def _decode_dali(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Decode with DALI's mixed (host + GPU) decoder, one pipeline kept per batch size; each
    image copied into a torch tensor on the device (``feed_ndarray``). Written against DALI's
    documented API; not run here (no DALI on the machines fastnas is tested on)."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import feed_ndarray

    index = device.index or 0
    key = (len(encoded), index)
    if key not in _DALI_PIPES:
        feed: list = []

        @pipeline_def(batch_size=len(encoded), num_threads=4, device_id=index, prefetch_queue_depth=1)
        def pipe():
            jpegs = fn.external_source(source=lambda: feed.pop(), batch=True, dtype=types.UINT8)
            return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB)

        p = pipe()
        p.build()
        _DALI_PIPES[key] = (p, feed)
    p, feed = _DALI_PIPES[key]
    feed.append([t.numpy().astype(np.uint8) for t in encoded])
    (images,) = p.run()
    out = []
    for i in range(len(encoded)):
        tensor = images[i]
        hwc = torch.empty(tuple(tensor.shape()), dtype=torch.uint8, device=device)
        feed_ndarray(tensor, hwc, cuda_stream=torch.cuda.current_stream(device))
        out.append(hwc.permute(2, 0, 1))
    return out


class DecodedBatches:
    """Wraps a loader of ``collate_encoded`` batches: yields ``(images on device, labels)``.

    The loader's workers keep reading files and choosing crops while the GPU decodes the
    current batch.
    """

    def __init__(self, loader, image_size: int, mean, std, device, decoder: str):
        self.loader, self.image_size, self.mean, self.std = loader, image_size, mean, std
        self.device, self.decoder = device, decoder

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for data, boxes, labels, paths in self.loader:
            x = decode_batch(data, boxes, self.image_size, self.mean, self.std, self.device, self.decoder, paths)
            yield x, labels
