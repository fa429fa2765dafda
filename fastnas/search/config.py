"""Search settings: one dataclass, filled with each method's published defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from fastnas.search.errors import SearchError

METHODS = ("darts", "darts-2nd", "pc-darts", "p-darts", "gdas")
SPACES = ("darts", "nb201")
DATASETS = ("digits", "cifar10", "cifar100", "imagenet")
AMP_DTYPES = ("bf16", "fp16")

# Per-method defaults from the papers (CIFAR settings). Keys are SearchConfig fields.
METHOD_DEFAULTS: dict[str, dict] = {
    "darts": dict(epochs=50, batch_size=64, lr=0.025, lr_min=0.001, arch_lr=3e-4),
    "darts-2nd": dict(epochs=50, batch_size=64, lr=0.025, lr_min=0.001, arch_lr=3e-4, unrolled=True),
    "pc-darts": dict(
        epochs=50,
        batch_size=256,
        lr=0.1,
        lr_min=0.0,
        arch_lr=6e-4,
        partial_channels=4,
        edge_normalization=True,
        warmup_epochs=15,
    ),
    # P-DARTS: 25 epochs in each of three stages, architecture frozen for the first 10.
    "p-darts": dict(
        epochs=75,
        batch_size=96,
        lr=0.025,
        lr_min=0.0,
        arch_lr=6e-4,
        warmup_epochs=10,
        layers=5,
        skip_drop=(0.0, 0.4, 0.7),
        max_skip_connect=2,
    ),
    "gdas": dict(epochs=240, batch_size=64, lr=0.025, lr_min=0.001, arch_lr=3e-4, tau_max=10.0, tau_min=0.1),
}

# What the paper values are for, so that a shorter run can scale the warm-up.
_PAPER_EPOCHS = {"pc-darts": 50, "p-darts": 75}

# The bundled digits are 8x8 and tiny: at their own resolution a small network
# and a few epochs finish in minutes on a CPU. The paper settings above apply to
# CIFAR and ImageNet.
DIGITS_DEFAULTS = dict(image_size=8, init_channels=8, layers=5, epochs=3, batch_size=64)
DIGITS_EPOCHS = {"p-darts": 3, "pc-darts": 4}

# Fields a resumed run must share with its checkpoint, or it would be a different search.
RESUME_FIELDS = (
    "method",
    "space",
    "dataset",
    "image_size",
    "fraction",
    "epochs",
    "batch_size",
    "lr",
    "lr_min",
    "momentum",
    "weight_decay",
    "arch_lr",
    "arch_betas",
    "arch_weight_decay",
    "grad_clip",
    "train_portion",
    "init_channels",
    "layers",
    "seed",
    "unrolled",
    "partial_channels",
    "edge_normalization",
    "warmup_epochs",
    "stage_layers",
    "stage_keep",
    "skip_drop",
    "max_skip_connect",
    "tau_max",
    "tau_min",
    "amp",
    "world_size",
)


@dataclass
class SearchConfig:
    """Everything that defines a search. Build one with ``SearchConfig.create``.

    Epoch counts are totals; for P-DARTS they are split evenly over the stages
    and ``warmup_epochs`` counts per stage.
    """

    method: str = "darts"
    space: str = "darts"
    dataset: str = "digits"
    data: str | None = None
    image_size: int | None = None
    fraction: float | None = None
    epochs: int = 50
    batch_size: int = 64
    lr: float = 0.025
    lr_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    arch_lr: float = 3e-4
    arch_betas: tuple = (0.5, 0.999)
    arch_weight_decay: float = 1e-3
    grad_clip: float = 5.0
    train_portion: float = 0.5
    init_channels: int = 16
    layers: int = 8
    seed: int = 0
    unrolled: bool = False
    partial_channels: int | None = None
    edge_normalization: bool = False
    warmup_epochs: int = 0
    stage_layers: tuple = ()
    stage_keep: tuple = ()
    skip_drop: tuple = ()
    max_skip_connect: int | None = None
    tau_max: float = 10.0
    tau_min: float = 0.1
    amp: str | None = None
    memory: str = "save"
    cuda_graph: bool = False
    backend: str | None = None
    device: str = "cpu"
    workers: int = 0
    world_size: int = 1
    primitives: tuple | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def create(cls, method: str = "darts", dataset: str = "digits", **overrides) -> SearchConfig:
        """The defaults of ``method`` on ``dataset``, then every override that is not None.

        Raises SearchError for an unknown method, space, dataset or amp type, and
        for combinations the methods do not support.
        """
        if method not in METHODS:
            raise SearchError(f"unknown search method {method!r}; choose one of {', '.join(METHODS)}")
        if dataset not in DATASETS:
            raise SearchError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(given) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"SearchConfig.create: unknown settings {sorted(unknown)}")
        values = dict(METHOD_DEFAULTS[method])
        if dataset == "digits":
            values.update(DIGITS_DEFAULTS)
            values["epochs"] = DIGITS_EPOCHS.get(method, DIGITS_DEFAULTS["epochs"])
        if dataset == "imagenet":
            values["image_size"] = 224
            if method == "pc-darts":
                values["partial_channels"] = 2
        values.update(method=method, dataset=dataset)
        if given.get("space") == "nb201":
            # NAS-Bench-201 counts cells per stage (N = 5), not cells in all.
            values["layers"] = 1 if dataset == "digits" else 5
        values.update(given)
        # Scale paper warm-ups to the epochs actually run, unless set explicitly.
        if "warmup_epochs" not in given and method in _PAPER_EPOCHS and "warmup_epochs" in values:
            paper = _PAPER_EPOCHS[method]
            if method == "p-darts":
                per_stage = max(1, values["epochs"] // 3)
                values["warmup_epochs"] = int(round(per_stage * values["warmup_epochs"] / (paper // 3)))
            else:
                values["warmup_epochs"] = int(round(values["epochs"] * values["warmup_epochs"] / paper))
        if method == "p-darts" and "stage_layers" not in given:
            layers = values.get("layers", cls.layers)
            values["stage_layers"] = (layers, layers + 6, layers + 12)
        if method == "p-darts" and "stage_keep" not in given:
            values["stage_keep"] = (5, 3)
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise SearchError for settings that cannot work together."""
        if self.space not in SPACES:
            raise SearchError(f"unknown search space {self.space!r}; choose one of {', '.join(SPACES)}")
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise SearchError(f"unknown --amp type {self.amp!r}; choose bf16 or fp16")
        if self.space == "nb201" and self.method in ("pc-darts", "p-darts"):
            raise SearchError(f"{self.method} searches the DARTS space only; use --space darts")
        if self.epochs < 1:
            raise SearchError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 2:
            raise SearchError(f"--batch-size must be at least 2 (batch norm needs two samples), got {self.batch_size}")
        if self.cuda_graph:
            from fastnas.search.cuda_graph import check_search_supported

            check_search_supported(self)
        if self.method == "p-darts":
            if len(self.stage_layers) != len(self.stage_keep) + 1:
                raise SearchError("p-darts needs one more stage in stage_layers than entries in stage_keep")
            if self.epochs < len(self.stage_layers):
                raise SearchError(f"p-darts needs at least one epoch per stage: --epochs >= {len(self.stage_layers)}")

    def stages(self) -> list[dict]:
        """The training stages: layers, epochs, warm-up epochs and skip dropout of each."""
        if self.method != "p-darts":
            return [dict(layers=self.layers, epochs=self.epochs, warmup=self.warmup_epochs, skip_drop=0.0)]
        n = len(self.stage_layers)
        # Epochs that do not split evenly go to the later, deeper stages.
        epochs = [self.epochs // n + (1 if i >= n - self.epochs % n else 0) for i in range(n)]
        drops = tuple(self.skip_drop) or (0.0,) * n
        return [
            dict(layers=layers, epochs=epochs[i], warmup=min(self.warmup_epochs, epochs[i]), skip_drop=drops[i])
            for i, layers in enumerate(self.stage_layers)
        ]

    def to_dict(self) -> dict:
        """Plain types only, so that the checkpoint loads with ``weights_only=True``."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, values: dict) -> SearchConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        tuples = {"arch_betas", "stage_layers", "stage_keep", "skip_drop", "primitives"}
        kwargs = {}
        for k, v in values.items():
            if k in names:
                kwargs[k] = tuple(v) if k in tuples and v is not None else v
        return cls(**kwargs)
