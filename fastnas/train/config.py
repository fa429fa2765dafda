"""Training settings: one dataclass, filled with the papers' defaults for each space and dataset
(each space's ``train_defaults``, beside its evaluation network)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fastnas.spaces import SPACES, get_space
from fastnas.train.errors import TrainError

DATASETS = ("digits", "cifar10", "cifar100", "imagenet")
AMP_DTYPES = ("bf16", "fp16")
LR_SCHEDULES = ("cosine", "exponential", "linear")

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
    The learning rate follows a cosine from ``lr`` to ``lr_min`` over the epochs,
    (``exponential``) is multiplied by ``lr_gamma`` after every epoch, or (``linear``)
    falls linearly from ``lr`` to 0 over the epochs.
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
    # Folder of TensorBoard event files (fastnas.search.scalars); not a RESUME_FIELD.
    tensorboard: str | None = None

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
        values = dict(get_space(space).train_defaults[dataset], space=space, dataset=dataset)
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
        if self.tensorboard is not None:
            from fastnas.search.scalars import missing_reason

            reason = missing_reason()
            if reason:
                raise TrainError(f"--tensorboard needs the tensorboard package ({reason})")
        if not 0.0 <= self.drop_path_prob < 1.0:
            raise TrainError(f"--drop-path-prob must be in [0, 1), got {self.drop_path_prob}")
        if self.cutout < 0 or self.crop_padding < 0:
            raise TrainError("--cutout and the crop padding must not be negative")
        why = get_space(self.space).check_train_config(self)
        if why:
            raise TrainError(why)
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
