"""Training settings: one dataclass, filled with the papers' defaults for each space and dataset
(each space's ``train_defaults``, beside its evaluation network)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fastnas.errors import TrainError
from fastnas.run.options import option, positive_int, same_on_resume_fields, setting
from fastnas.spaces import SPACES, get_space

DATASETS = ("digits", "cifar10", "cifar100", "imagenet")
AMP_DTYPES = ("bf16", "fp16")
LR_SCHEDULES = ("cosine", "exponential", "linear")

DEVICES = ("cpu", "cuda")


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

    space: str = option("darts", "the architecture's space (default: what it is)", same_on_resume=True, choices=SPACES)
    genotype: dict | None = setting(None, same_on_resume=True)
    dataset: str = option(
        "digits", "dataset (default: the search's, else {default})", same_on_resume=True, choices=DATASETS
    )
    data: str | None = option(None, "folder of the cifar10/cifar100/imagenet files", metavar="PATH")
    image_size: int | None = option(None, "side of the (square) input images", same_on_resume=True, type=positive_int)
    fraction: float | None = option(None, "use this fraction of each training class", same_on_resume=True, type=float)
    epochs: int = option(600, "training epochs", same_on_resume=True, type=positive_int)
    batch_size: int = option(96, "images per step over all processes", same_on_resume=True, type=positive_int)
    lr: float = option(0.025, "initial learning rate", same_on_resume=True, type=float)
    lr_schedule: str = setting("cosine", same_on_resume=True)
    lr_min: float = setting(0.0, same_on_resume=True)
    lr_gamma: float = setting(0.97, same_on_resume=True)
    momentum: float = setting(0.9, same_on_resume=True)
    nesterov: bool = setting(False, same_on_resume=True)
    weight_decay: float = option(3e-4, "SGD weight decay", same_on_resume=True, type=float)
    grad_clip: float | None = setting(5.0, same_on_resume=True)
    init_channels: int = option(36, "channels of the first cells (C)", same_on_resume=True, type=positive_int)
    layers: int = option(20, "cells (nb201: cells per stage, N)", same_on_resume=True, type=positive_int)
    auxiliary: bool = option(
        True,
        "the DARTS auxiliary head after the second reduction (needs 32x32 CIFAR or 224x224 ImageNet images)",
        same_on_resume=True,
        type=bool,
    )
    auxiliary_weight: float = option(0.4, "weight of the auxiliary loss ({default})", same_on_resume=True, type=float)
    drop_path_prob: float = option(
        0.2, "drop-path probability, reached linearly from 0", same_on_resume=True, type=float
    )
    label_smoothing: float = setting(0.0, same_on_resume=True)
    crop_padding: int = setting(4, same_on_resume=True)
    flip: bool = setting(True, same_on_resume=True)
    cutout: int = option(16, "side of the cutout square, 0 for none", same_on_resume=True, type=int)
    imagenet_augment: bool = setting(False, same_on_resume=True)
    amp: str | None = option(
        None, "mixed precision (fp16 uses loss scaling on CUDA)", same_on_resume=True, choices=AMP_DTYPES
    )
    device: str = option("cpu", "where to run (default: {default})", choices=DEVICES)
    workers: int = option(0, "data-loader worker processes (default: {default})", type=int)
    seed: int = option(0, "random seed (default: {default})", same_on_resume=True, type=int)
    world_size: int = setting(1, same_on_resume=True)
    latency_batch: int = option(1, "batch of the latency measurement ({default})", type=positive_int)
    # Folder of TensorBoard event files (fastnas.run.scalars); how a run reports, so a resumed run may change it.
    tensorboard: str | None = option(
        None,
        "also write each epoch's losses and accuracies as TensorBoard event files to DIR (needs tensorboard)",
        metavar="DIR",
    )

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
            from fastnas.run.scalars import missing_reason

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


# Fields a resumed training must share with its checkpoint, or it would be a different training.
RESUME_FIELDS = same_on_resume_fields(TrainConfig)
