"""Search settings: one dataclass, filled with each method's published defaults
(``fastnas.search.methods``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from fastnas.search.errors import SearchError
from fastnas.search.methods import get_method
from fastnas.search.methods.amended_darts import AMEND_COEFFICIENT
from fastnas.search.methods.la_darts import LATENCY_WEIGHT
from fastnas.spaces import SPACES, get_space

DATASETS = ("digits", "cifar10", "cifar100", "imagenet")
AMP_DTYPES = ("bf16", "fp16")

# The bundled digits are 8x8 and tiny: at their own resolution a small network
# and a few epochs (each method's ``digits_epochs``) finish in minutes on a CPU.
# The methods' paper settings apply to CIFAR and ImageNet.
DIGITS_DEFAULTS = dict(image_size=8, init_channels=8, layers=5, batch_size=64)

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
    "lr_warmup_epochs",
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
    "gdas_form",
    "arch_grad_clip",
    "label_smoothing",
    "amend_coefficient",
    "latency_model_sha256",
    "latency_weight",
    "activations",
    "amp",
    "world_size",
    "bn_affine",
    "bn_track",
    "path_dropout",
    "ghost_batch_size",
    "global_dropout",
    "layer_path_dropout",
    "ops_on_nodes",
    "ofa_kernel",
    "constraint",
    "constraint_min",
    "constraint_max",
)
CONSTRAINTS = ("params", "flops")


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
    # Epochs of a linear learning-rate warm-up (lr * (e + 1) / n) before the cosine schedule
    # takes over (PC-DARTS on ImageNet, methods/pc_darts.py).
    lr_warmup_epochs: int = 0
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
    # GDAS: how an edge computes its hard sample ("sum" or "one"; None: the space's, see methods/gdas.py).
    gdas_form: str | None = None
    # Norm the architecture's gradient is clipped to before its step (None: not clipped; P-DARTS 5).
    arch_grad_clip: float | None = None
    # Label smoothing of the supernet's training loss (SPOS 0.1).
    label_smoothing: float = 0.0
    amend_coefficient: float = AMEND_COEFFICIENT
    latency_model: str | None = None
    latency_model_sha256: str | None = None
    latency_weight: float = LATENCY_WEIGHT
    activations: tuple | None = None
    amp: str | None = None
    memory: str = "save"
    # None: capture the step as a CUDA graph wherever that works (on CUDA).
    cuda_graph: bool | None = None
    backend: str | None = None
    device: str = "cpu"
    # Data-loader worker processes per rank; None: fastnas.search.data.default_workers (0 for
    # data held in memory, most of the cores for an image folder).
    workers: int | None = None
    # Who decodes an image folder's JPEGs (fastnas.data.pipeline.DECODERS): cpu (Pillow, in the
    # workers), cuda (torchvision.io.decode_jpeg on the GPU) or dali (NVIDIA DALI).
    decode: str = "cpu"
    world_size: int = 1
    # Folder of TensorBoard event files (fastnas.search.scalars); how a run reports, so not a RESUME_FIELD.
    tensorboard: str | None = None
    primitives: tuple | None = None
    # Single-path and one-shot supernets (spos, fairnas, oneshot; fastnas.search.methods.single_path).
    bn_affine: bool = False
    bn_track: bool = True
    path_dropout: float = 0.0
    ghost_batch_size: int | None = None
    # Yu et al.'s supernet heuristics, the nb201 supernet's (fastnas.spaces.nb201_heuristics).
    global_dropout: float = 0.0
    layer_path_dropout: float = 0.0
    ops_on_nodes: bool = False
    ofa_kernel: bool = False
    constraint: str | None = None
    constraint_min: float | None = None
    constraint_max: float | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def create(cls, method: str = "darts", dataset: str = "digits", **overrides) -> SearchConfig:
        """The defaults of ``method`` on ``dataset``, then every override that is not None.

        Raises SearchError for an unknown method, space, dataset or amp type, and
        for combinations the methods do not support.
        """
        search_method = get_method(method)
        if dataset not in DATASETS:
            raise SearchError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(given) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"SearchConfig.create: unknown settings {sorted(unknown)}")
        values = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        values.update(search_method.defaults)
        if dataset == "digits":
            values.update(DIGITS_DEFAULTS, epochs=search_method.digits_epochs)
        if dataset == "imagenet":
            values["image_size"] = 224
        values.update(method=method, dataset=dataset)
        space = given.get("space", values["space"])
        layers = get_space(space).search_layers(dataset) if space in SPACES else None
        if layers is not None:
            values["layers"] = layers
        values.update(given)
        # Scale paper warm-ups to the epochs actually run, unless set explicitly.
        if "warmup_epochs" not in given and search_method.paper_epochs:
            values["warmup_epochs"] = search_method.scaled_warmup(values)
        search_method.configure(values, given)
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise SearchError for settings that cannot work together."""
        if self.space not in SPACES:
            raise SearchError(f"unknown search space {self.space!r}; choose one of {', '.join(SPACES)}")
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise SearchError(f"unknown --amp type {self.amp!r}; choose bf16 or fp16")
        if self.constraint is not None:
            if self.constraint not in CONSTRAINTS:
                raise SearchError(f"unknown --constraint {self.constraint!r}; choose {' or '.join(CONSTRAINTS)}")
            if self.constraint_max is None:
                raise SearchError("--constraint needs --constraint-max (and optionally --constraint-min)")
            if self.constraint_min is not None and self.constraint_min > self.constraint_max:
                raise SearchError(
                    f"--constraint-min {self.constraint_min} is above --constraint-max {self.constraint_max}"
                )
        if not 0.0 < self.train_portion < 1.0:
            raise SearchError(f"--train-portion must be between 0 and 1, got {self.train_portion}")
        if not 0 <= self.lr_warmup_epochs <= self.epochs:
            raise SearchError(f"--lr-warmup-epochs must be between 0 and --epochs, got {self.lr_warmup_epochs}")
        if self.workers is not None and self.workers < 0:
            raise SearchError(f"--workers must be 0 or more, got {self.workers}")
        from fastnas.data.pipeline import check_decode

        try:
            check_decode(self.decode, self.dataset, self.device)
        except ValueError as exc:
            raise SearchError(str(exc)) from None
        if self.tensorboard is not None:
            from fastnas.search.scalars import missing_reason

            reason = missing_reason()
            if reason:
                raise SearchError(f"--tensorboard needs the tensorboard package ({reason})")
        self.search_method.validate(self)
        get_space(self.space).validate_search(self)
        if self.epochs < 1:
            raise SearchError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 2:
            raise SearchError(f"--batch-size must be at least 2 (batch norm needs two samples), got {self.batch_size}")
        if self.cuda_graph is True:
            from fastnas.search.cuda_graph import check_search_supported

            check_search_supported(self)

    @property
    def search_method(self):
        """The ``fastnas.search.methods.SearchMethod`` named by ``method``."""
        return get_method(self.method)

    def stages(self) -> list[dict]:
        """The training stages: layers, epochs, warm-up epochs and skip dropout of each."""
        return self.search_method.stages(self)

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
        tuples = {"arch_betas", "stage_layers", "stage_keep", "skip_drop", "primitives", "activations"}
        kwargs = {}
        for k, v in values.items():
            if k in names:
                kwargs[k] = tuple(v) if k in tuples and v is not None else v
        return cls(**kwargs)
