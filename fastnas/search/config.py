"""Search settings: one dataclass, filled with each method's published defaults
(``fastnas.search.methods``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fastnas.data.pipeline import DECODERS
from fastnas.errors import SearchError
from fastnas.nn.edge_plan import MEMORY_MODES
from fastnas.nn.mixed_op import HARD_FORMS
from fastnas.run.options import name_list, option, positive_int, rate_list, same_on_resume_fields, setting
from fastnas.search.methods import METHODS, get_method
from fastnas.spaces import SPACES, get_space

DATASETS = ("digits", "cifar10", "cifar100", "imagenet")
AMP_DTYPES = ("bf16", "fp16")

# The bundled digits are 8x8 and tiny: at their own resolution a small network
# and a few epochs (each method's ``digits_epochs``) finish in minutes on a CPU.
# The methods' paper settings apply to CIFAR and ImageNet.
DIGITS_DEFAULTS = dict(image_size=8, init_channels=8, layers=5, batch_size=64)

CONSTRAINTS = ("params", "flops")
DEVICES = ("cpu", "cuda")


@dataclass
class SearchConfig:
    """Everything that defines a search. Build one with ``SearchConfig.create``.

    Epoch counts are totals; for P-DARTS they are split evenly over the stages
    and ``warmup_epochs`` counts per stage.
    """

    method: str = option("darts", "search method (default: {default})", same_on_resume=True, choices=METHODS)
    space: str = option("darts", "search space (default: {default})", same_on_resume=True, choices=SPACES)
    dataset: str = option("digits", "dataset (default: {default}, bundled)", same_on_resume=True, choices=DATASETS)
    data: str | None = option(None, "folder of the cifar10/cifar100/imagenet files", metavar="PATH")
    image_size: int | None = option(None, "side of the (square) input images", same_on_resume=True, type=positive_int)
    fraction: float | None = option(None, "use this fraction of each training class", same_on_resume=True, type=float)
    epochs: int = option(50, "epochs in all (P-DARTS: split over 3 stages)", same_on_resume=True, type=positive_int)
    batch_size: int = option(64, "images per step over all processes", same_on_resume=True, type=positive_int)
    lr: float = option(0.025, "weight learning rate", same_on_resume=True, type=float)
    lr_min: float = setting(0.001, same_on_resume=True)
    # Epochs of a linear learning-rate warm-up (lr * (e + 1) / n) before the cosine schedule
    # takes over (PC-DARTS on ImageNet, methods/pc_darts.py).
    lr_warmup_epochs: int = option(
        0,
        "epochs of a linear warm-up of --lr before its cosine schedule (PC-DARTS on ImageNet: 5)",
        same_on_resume=True,
        type=int,
    )
    momentum: float = setting(0.9, same_on_resume=True)
    weight_decay: float = option(3e-4, "SGD weight decay of the weights", same_on_resume=True, type=float)
    arch_lr: float = option(3e-4, "architecture learning rate", same_on_resume=True, type=float)
    arch_betas: tuple = setting((0.5, 0.999), same_on_resume=True)
    arch_weight_decay: float = setting(1e-3, same_on_resume=True)
    grad_clip: float = setting(5.0, same_on_resume=True)
    train_portion: float = option(0.5, "share of the training images the weights see", same_on_resume=True, type=float)
    init_channels: int = option(16, "channels of the first cells", same_on_resume=True, type=positive_int)
    layers: int = option(
        8, "cells (P-DARTS: of the first stage; nb201: cells per stage)", same_on_resume=True, type=positive_int
    )
    seed: int = option(0, "random seed (default: {default})", same_on_resume=True, type=int)
    unrolled: bool = setting(False, same_on_resume=True)
    partial_channels: int | None = option(None, "PC-DARTS K", same_on_resume=True, type=positive_int)
    edge_normalization: bool = setting(False, same_on_resume=True)
    warmup_epochs: int = option(
        0, "epochs before the architecture learns (PC-DARTS; P-DARTS per stage)", same_on_resume=True, type=int
    )
    stage_layers: tuple = setting((), same_on_resume=True)
    stage_keep: tuple = setting((), same_on_resume=True)
    skip_drop: tuple = option(
        (),
        "p-darts: initial skip-connect dropout of each stage (default 0.1,0.4,0.7, the released code's "
        "command; the paper's: 0.0,0.4,0.7 on cifar10, 0.1,0.2,0.3 on cifar100)",
        same_on_resume=True,
        type=rate_list,
        metavar="P1,P2,P3",
    )
    max_skip_connect: int | None = setting(None, same_on_resume=True)
    tau_max: float = setting(10.0, same_on_resume=True)
    tau_min: float = setting(0.1, same_on_resume=True)
    # GDAS: how an edge computes its hard sample ("sum" or "one"; None: the space's, see methods/gdas.py).
    gdas_form: str | None = option(
        None,
        "an edge's hard sample plus its other hard weights (sum: AutoDL's NAS-Bench-201 GDAS, the "
        "nb201 default) or alone (one: AutoDL's NASNet-space GDAS, the darts default)",
        same_on_resume=True,
        choices=HARD_FORMS,
    )
    # Norm the architecture's gradient is clipped to before its step (None: not clipped; P-DARTS 5).
    arch_grad_clip: float | None = option(
        None,
        "clip the architecture's gradient to this norm (default: p-darts 5, pc-darts on imagenet 5, else none)",
        same_on_resume=True,
        type=float,
    )
    # Label smoothing of the supernet's training loss (SPOS 0.1).
    label_smoothing: float = option(
        0.0,
        "spos: label smoothing of the supernet's training loss (default 0.1)",
        same_on_resume=True,
        type=float,
    )
    # Amended-DARTS' amending coefficient: the paper's.
    amend_coefficient: float = option(
        0.1, "eta, the weight of the amending term (the paper's {default})", same_on_resume=True, type=float
    )
    latency_model: str | None = option(None, "the latency predictor (made by fastnas latency-model)", metavar="FILE")
    latency_model_sha256: str | None = setting(None, same_on_resume=True)
    # LA-DARTS' lambda, per millisecond of predicted latency.
    latency_weight: float = option(
        0.01,
        "lambda, the weight of the predicted latency in milliseconds (default {default})",
        same_on_resume=True,
        type=float,
    )
    activations: tuple | None = option(
        None,
        "scalable-darts: the activation factor (default: relu,relu6,elu,leaky_relu,swish; also hardswish)",
        same_on_resume=True,
        type=name_list,
        metavar="A,B,...",
    )
    amp: str | None = option(
        None, "mixed precision (fp16 uses loss scaling on CUDA)", same_on_resume=True, choices=AMP_DTYPES
    )
    memory: str = option(
        "save",
        "what each edge keeps for backward: save (pre-BN tensors only; default), recompute "
        "(nothing, recomputed inside the fused backward), checkpoint (eager modules under "
        "torch.utils.checkpoint), sum (eager modules, only the weighted sum fused)",
        choices=MEMORY_MODES,
    )
    # None: capture the step as a CUDA graph wherever that works (on CUDA).
    cuda_graph: bool | None = option(
        None,
        "capture the search step once per epoch as a CUDA graph and replay it (default: on CUDA, "
        "wherever capture works)",
        type=bool,
    )
    backend: str | None = option(None, "fused-op backend: auto, reference, cpu, cuda, triton")
    device: str = option("cpu", "where to run (default: {default})", choices=DEVICES)
    # Data-loader worker processes per rank; None: fastnas.run.data.default_workers (0 for
    # data held in memory, most of the cores for an image folder).
    workers: int | None = option(
        None,
        "data-loader worker processes per process (default: 0 for digits and CIFAR, held in memory; "
        "for an image folder the cores less one, at most 12)",
        type=int,
    )
    # Who decodes an image folder's JPEGs (fastnas.data.pipeline.DECODERS): cpu (Pillow, in the
    # workers), cuda (torchvision.io.decode_jpeg on the GPU) or dali (NVIDIA DALI).
    decode: str = option(
        "cpu",
        "who decodes an image folder's JPEGs: cpu (Pillow in the workers; default), cuda "
        "(torchvision.io.decode_jpeg on the GPU) or dali (NVIDIA DALI, if installed)",
        choices=DECODERS,
    )
    world_size: int = setting(1, same_on_resume=True)
    # Folder of TensorBoard event files (fastnas.run.scalars); how a run reports, so a resumed run may change it.
    tensorboard: str | None = option(
        None,
        "also write each epoch's losses, accuracies and architecture weights as TensorBoard event files to DIR "
        "(needs the tensorboard package)",
        metavar="DIR",
    )
    primitives: tuple | None = setting(None)
    # Single-path and one-shot supernets (spos, fairnas, oneshot; fastnas.search.methods.single_path).
    bn_affine: bool = option(
        False, "affine batch norms inside the candidates (default: off)", same_on_resume=True, type=bool
    )
    bn_track: bool = option(
        True,
        "batch norms keep running statistics (default: on; oneshot: off, batch statistics)",
        same_on_resume=True,
        type=bool,
    )
    path_dropout: float = option(
        0.0,
        "spos/fairnas: drop probability of each sampled candidate, rising linearly from 0; oneshot: r, "
        "the end probability that all k inputs of a node go (each r^(1/k))",
        same_on_resume=True,
        type=float,
    )
    ghost_batch_size: int | None = option(
        None, "oneshot: images per ghost batch", same_on_resume=True, type=positive_int
    )
    # Yu et al.'s supernet heuristics, the nb201 supernet's (fastnas.spaces.nb201.heuristics).
    global_dropout: float = option(
        0.0,
        "nb201, single-path methods: dropout of the pooled features before the classifier (Yu et al.)",
        same_on_resume=True,
        type=float,
    )
    layer_path_dropout: float = option(
        0.0,
        "nb201, single-path methods: r; the output of cell l of L (reductions counted) is dropped per image "
        "with probability r (l + 1) / L (Yu et al.'s path dropout, not ramped over epochs)",
        same_on_resume=True,
        type=float,
    )
    ops_on_nodes: bool = option(
        False,
        "nb201, single-path methods: a node's edges from nodes 2, ... run the candidates of its edge from "
        "node 1 (Yu et al.'s op_on_node; default: off, every edge its own)",
        same_on_resume=True,
        type=bool,
    )
    ofa_kernel: bool = option(
        False,
        "nb201, single-path methods: nor_conv_1x1 is the centre of nor_conv_3x3's kernel times a learned "
        "factor, with one batch norm (OFA's kernel transformation, as Yu et al.; default: off)",
        same_on_resume=True,
        type=bool,
    )
    constraint: str | None = option(
        None,
        "spos: sample only architectures whose stand-alone network's parameters or FLOPs "
        "(multiply-adds per image) lie within --constraint-min/--constraint-max",
        same_on_resume=True,
        choices=CONSTRAINTS,
    )
    constraint_min: float | None = option(None, "lower end of the --constraint range", same_on_resume=True, type=float)
    constraint_max: float | None = option(None, "upper end of the --constraint range", same_on_resume=True, type=float)
    extra: dict = setting(default_factory=dict)

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
            from fastnas.run.scalars import missing_reason

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


# Fields a resumed run must share with its checkpoint, or it would be a different search.
RESUME_FIELDS = same_on_resume_fields(SearchConfig)
