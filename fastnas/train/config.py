"""Training settings: one dataclass, filled with the papers' defaults for each space and dataset."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fastnas.train.errors import TrainError

SPACES = ("darts", "nb201")
DATASETS = ("digits", "cifar10", "cifar100", "imagenet")
AMP_DTYPES = ("bf16", "fp16")
LR_SCHEDULES = ("cosine", "exponential")

# DARTS cnn/train.py: NetworkCIFAR, C=36, 20 cells, auxiliary head (weight 0.4),
# drop-path to 0.2, cutout 16, 600 epochs of batch 96, SGD 0.025 cosine to 0, wd 3e-4, clip 5.
DARTS_CIFAR = dict(
    init_channels=36, layers=20, auxiliary=True, auxiliary_weight=0.4, drop_path_prob=0.2,
    epochs=600, batch_size=96, lr=0.025, lr_schedule="cosine", lr_min=0.0, weight_decay=3e-4, grad_clip=5.0,
    crop_padding=4, flip=True, cutout=16,
)  # fmt: skip

# DARTS cnn/train_imagenet.py: NetworkImageNet, C=48, 14 cells, auxiliary head, label smoothing 0.1,
# 250 epochs of batch 128, SGD 0.1 times 0.97 after every epoch, wd 3e-5, clip 5, no drop-path;
# random resized crops, flips and colour jitter (0.4, 0.4, 0.4, 0.2).
DARTS_IMAGENET = dict(
    init_channels=48, layers=14, auxiliary=True, auxiliary_weight=0.4, drop_path_prob=0.0, label_smoothing=0.1,
    epochs=250, batch_size=128, lr=0.1, lr_schedule="exponential", lr_gamma=0.97, weight_decay=3e-5, grad_clip=5.0,
    image_size=224, crop_padding=0, flip=True, cutout=0, imagenet_augment=True,
)  # fmt: skip

# NAS-Bench-201 (AutoDL configs/nas-benchmark/hyper-opts/200E.config): C=16, N=5, 200 epochs of
# batch 256, SGD Nesterov 0.1 cosine to 0, wd 5e-4, no clipping; random crops (padding 4) and flips.
NB201_CIFAR = dict(
    init_channels=16, layers=5, auxiliary=False, drop_path_prob=0.0,
    epochs=200, batch_size=256, lr=0.1, lr_schedule="cosine", lr_min=0.0, nesterov=True, weight_decay=5e-4,
    grad_clip=None, crop_padding=4, flip=True, cutout=0,
)  # fmt: skip

# The benchmark trains on ImageNet as ImageNet16-120: 16x16 images, crops with padding 2.
NB201_IMAGENET = dict(NB201_CIFAR, image_size=16, crop_padding=2)

# The bundled digits are 8x8: a small network and 30 epochs train in a few minutes on
# one CPU thread. Augmentation scales with the side: crops pad 1 pixel (4 of CIFAR's 32),
# cutout erases 2x2 (DARTS' 16 of 32 would blank a quarter of a digit, enough to change
# it into another); no flips, which turn digits into other shapes. The auxiliary head
# needs 8x8 after the second reduction (32x32 images), so it is off.
DIGITS_DARTS = dict(
    DARTS_CIFAR, init_channels=16, layers=8, auxiliary=False, epochs=30, batch_size=96, image_size=8,
    crop_padding=1, flip=False, cutout=2,
)  # fmt: skip
DIGITS_NB201 = dict(
    NB201_CIFAR, init_channels=16, layers=2, epochs=30, batch_size=96, image_size=8, crop_padding=1, flip=False,
)  # fmt: skip

DEFAULTS = {
    ("darts", "digits"): DIGITS_DARTS,
    ("darts", "cifar10"): DARTS_CIFAR,
    ("darts", "cifar100"): DARTS_CIFAR,
    ("darts", "imagenet"): DARTS_IMAGENET,
    ("nb201", "digits"): DIGITS_NB201,
    ("nb201", "cifar10"): NB201_CIFAR,
    ("nb201", "cifar100"): NB201_CIFAR,
    ("nb201", "imagenet"): NB201_IMAGENET,
}

# Fields a resumed training must share with its checkpoint, or it would be a different training.
RESUME_FIELDS = (
    "space", "genotype", "dataset", "image_size", "fraction", "epochs", "batch_size", "lr", "lr_schedule", "lr_min",
    "lr_gamma", "momentum", "nesterov", "weight_decay", "grad_clip", "init_channels", "layers", "auxiliary",
    "auxiliary_weight", "drop_path_prob", "label_smoothing", "crop_padding", "flip", "cutout", "imagenet_augment",
    "seed", "amp", "world_size",
)  # fmt: skip


@dataclass
class TrainConfig:
    """Everything that defines a training from scratch. Build one with ``TrainConfig.create``.

    ``genotype`` is the architecture in its JSON form: a DARTS genotype dict
    (``fastnas.spaces.genotype_to_dict``) or ``{"arch": "<NAS-Bench-201 string>"}``.
    ``drop_path_prob`` is the final probability: epoch e of E uses ``drop_path_prob * e / E``.
    The learning rate follows a cosine from ``lr`` to ``lr_min`` over the epochs, or
    (``exponential``) is multiplied by ``lr_gamma`` after every epoch.
    """

    space: str = "darts"
    genotype: dict | None = None
    dataset: str = "digits"
    data: str | None = None
    image_size: int | None = None
    fraction: float | None = None
    epochs: int = 600
    batch_size: int = 96
    lr: float = 0.025
    lr_schedule: str = "cosine"
    lr_min: float = 0.0
    lr_gamma: float = 0.97
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 3e-4
    grad_clip: float | None = 5.0
    init_channels: int = 36
    layers: int = 20
    auxiliary: bool = True
    auxiliary_weight: float = 0.4
    drop_path_prob: float = 0.2
    label_smoothing: float = 0.0
    crop_padding: int = 4
    flip: bool = True
    cutout: int = 16
    imagenet_augment: bool = False
    amp: str | None = None
    device: str = "cpu"
    workers: int = 0
    seed: int = 0
    world_size: int = 1
    latency_batch: int = 1

    @classmethod
    def create(cls, space: str = "darts", dataset: str = "digits", **overrides) -> TrainConfig:
        """The defaults of ``space`` on ``dataset``, then every override that is not None.

        Raises TrainError for an unknown space, dataset or amp type and for settings that cannot work.
        """
        if space not in SPACES:
            raise TrainError(f"unknown search space {space!r}; choose one of {', '.join(SPACES)}")
        if dataset not in DATASETS:
            raise TrainError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(given) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"TrainConfig.create: unknown settings {sorted(unknown)}")
        values = dict(DEFAULTS[(space, dataset)], space=space, dataset=dataset)
        values.update(given)
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise TrainError for settings that cannot work together."""
        if self.space not in SPACES:
            raise TrainError(f"unknown search space {self.space!r}; choose one of {', '.join(SPACES)}")
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise TrainError(f"unknown --amp type {self.amp!r}; choose bf16 or fp16")
        if self.lr_schedule not in LR_SCHEDULES:
            raise TrainError(f"unknown learning-rate schedule {self.lr_schedule!r}; choose {' or '.join(LR_SCHEDULES)}")
        if self.epochs < 1:
            raise TrainError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 2:
            raise TrainError(f"--batch-size must be at least 2 (batch norm needs two samples), got {self.batch_size}")
        if not 0.0 <= self.drop_path_prob < 1.0:
            raise TrainError(f"--drop-path-prob must be in [0, 1), got {self.drop_path_prob}")
        if self.cutout < 0 or self.crop_padding < 0:
            raise TrainError("--cutout and the crop padding must not be negative")
        if self.auxiliary and self.space == "nb201":
            raise TrainError("the NAS-Bench-201 network has no auxiliary head; drop --auxiliary")
        if self.auxiliary and self.image_size is not None:
            smallest = self.auxiliary_min_image_size()
            if self.image_size < smallest:
                raise TrainError(
                    f"the auxiliary head needs images of at least {smallest}x{smallest} on {self.dataset} "
                    f"(it pools the output of the second reduction cell), got {self.image_size}; use --no-auxiliary"
                )

    def auxiliary_min_image_size(self) -> int:
        """The smallest images the DARTS auxiliary head takes: 8x8 (CIFAR head) or 7x7 (ImageNet head) there."""
        # The CIFAR network keeps the stem's resolution until two reductions (/4);
        # the ImageNet one has its stem's /8 before them.
        return 224 if self.dataset == "imagenet" else 32

    def to_dict(self) -> dict:
        """Plain types only, so that the checkpoint loads with ``weights_only=True``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})
