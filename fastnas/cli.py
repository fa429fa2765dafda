"""The ``fastnas`` command: ``search``, ``select``, ``train``, ``rank-eval``, ``bench-step`` and ``info``.

``fastnas search`` with no options runs DARTS on scikit-learn's digits on the
CPU in a few minutes, and ends by printing the ``fastnas train`` command that
trains what it found from scratch; ``fastnas search --help`` and
``fastnas train --help`` list the rest. Input errors end with one line on
stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

SEARCH_DESCRIPTION = """\
Run a DARTS-family architecture search and write, to the output folder,
genotype.json (the found cells), cells.png (a picture of them), log.jsonl (one
JSON line per epoch) and checkpoint.pt (written atomically after every epoch),
and, redrawn after every epoch, arch_weights.png (every edge's architecture
weights over the epochs) and curves.png (loss and accuracy); fastnas plot
RUN_DIR draws these two again. --tensorboard DIR also writes the epochs'
scalars as TensorBoard event files.

On --dataset digits (the default, bundled, nothing to download) the network
and the run are small: the 8x8 images, 8 initial channels, 5 cells, 3 epochs,
one CPU thread; it takes a few minutes on a laptop CPU. On cifar10, cifar100 and imagenet the defaults are the papers':
DARTS batch 64, 50 epochs, SGD 0.025 cosine to 0.001, arch Adam 3e-4;
PC-DARTS batch 256, lr 0.1, arch lr 6e-4, 15 warm-up epochs, K=4 (2 on
ImageNet); P-DARTS 3 stages of 5/11/17 cells, 25 epochs each, 10 warm-up;
GDAS tau 10 -> 0.1. Any option given on the command line overrides them.

Several processes: torchrun --nproc_per_node N -m fastnas search ...
(--batch-size is then the total over all processes).

spos, fairnas and oneshot train a supernet by paths and no architecture
weights; their output folder holds the trained supernet (checkpoint.pt), and
fastnas select searches over it for the genotype.

On one GPU the whole step (both passes and both optimizer steps) is captured
once per epoch as a CUDA graph and replayed, so the CPU no longer launches its
thousands of small kernels one by one. That is the default wherever capture
works (every method but gdas, spos, fairnas and oneshot; no --amp fp16,
--memory checkpoint or several processes); elsewhere the search says in one
line why it runs without one.
--no-cuda-graph turns capture off; --cuda-graph insists on it (an error, with
the reason, where it cannot work).
"""


TRAIN_DESCRIPTION = """\
Train an architecture from scratch on the evaluation network of its space and
report its test accuracy, parameters, FLOPs per image and inference latency.
ARCHITECTURE is the output folder of fastnas search (its genotype.json; its
checkpoint says the space, dataset and data folder searched), a genotype JSON
file (DARTS, or {"arch": "..."} for NAS-Bench-201), or a NAS-Bench-201
architecture string. The output folder receives log.jsonl (one JSON line per
epoch), checkpoint.pt (written atomically after every epoch) and report.json.

Defaults are the papers': DARTS on CIFAR, C=36, 20 cells, auxiliary head
(weight 0.4), drop-path 0.2, cutout 16, 600 epochs of batch 96, SGD 0.025
cosine, weight decay 3e-4, clip 5; DARTS on ImageNet, C=48, 14 cells, label
smoothing 0.1, 250 epochs of batch 128, lr 0.1 times 0.97 per epoch, weight
decay 3e-5; NAS-Bench-201, C=16, N=5, 200 epochs of batch 256, Nesterov SGD
0.1 cosine, weight decay 5e-4. On the bundled digits a small network (C=16,
8 cells; NAS-Bench-201 N=2) trains 30 epochs in a few minutes on one CPU thread.

Several processes: torchrun --nproc_per_node N -m fastnas train ...
(--batch-size is then the total over all processes).
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _name_list(text: str) -> tuple:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _rate_list(text: str) -> tuple:
    try:
        return tuple(float(v) for v in _name_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_benchmark_options(p, what: str) -> None:
    """--benchmark FILE and which of its accuracies to read (fastnas.spaces.nb201_benchmark)."""
    from fastnas.spaces.nb201_benchmark import DATASETS, EPOCHS, SETS

    p.add_argument(
        "--benchmark", metavar="FILE", default=None,
        help=f"a NAS-Bench-201 benchmark file (nb201 space; needs pip install nas-bench-201): {what}",
    )  # fmt: skip
    p.add_argument(
        "--benchmark-dataset", choices=DATASETS, default="cifar10-valid", help="benchmark: dataset (cifar10-valid)"
    )
    p.add_argument("--benchmark-set", choices=SETS, default="valid", help="benchmark: valid (default) or test accuracy")
    p.add_argument("--benchmark-epochs", type=int, choices=EPOCHS, default=200, help="benchmark: schedule (200)")


def _benchmark_metric(args: argparse.Namespace) -> dict:
    return {"dataset": args.benchmark_dataset, "set": args.benchmark_set, "epochs": args.benchmark_epochs}


def _benchmark_accuracy(args: argparse.Namespace, genotype) -> tuple[str, float]:
    """What the benchmark is and its accuracy of one NAS-Bench-201 cell."""
    from fastnas.spaces.nb201_benchmark import BenchmarkMetric, NB201Benchmark

    bench = NB201Benchmark(args.benchmark, BenchmarkMetric(**_benchmark_metric(args)))
    return bench.describe(), bench.accuracy(genotype)


def build_parser() -> argparse.ArgumentParser:
    from fastnas._version import __version__
    from fastnas.nn.edge_plan import MEMORY_MODES
    from fastnas.search.config import AMP_DTYPES, DATASETS, SPACES
    from fastnas.search.methods import METHODS, REGISTRY

    parser = argparse.ArgumentParser(prog="fastnas", description="Fused-kernel weight-sharing architecture search.")
    parser.add_argument("--version", action="version", version=f"fastnas {__version__}")
    sub = parser.add_subparsers(
        dest="command", metavar="{search,select,train,rank-eval,latency-model,plot,bench-step,info}"
    )

    s = sub.add_parser(
        "search",
        help="run an architecture search",
        description=SEARCH_DESCRIPTION
        + "\nMethods (--method):\n"
        + "".join(f"  {name:<16}{method.summary}\n" for name, method in REGISTRY.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--method", choices=METHODS, default=None, help="search method (default: darts)")
    s.add_argument("--space", choices=SPACES, default=None, help="search space (default: darts)")
    s.add_argument("--dataset", choices=DATASETS, default=None, help="dataset (default: digits, bundled)")
    s.add_argument("--data", metavar="PATH", default=None, help="folder of the cifar10/cifar100/imagenet files")
    s.add_argument("--fraction", type=float, default=None, help="use this fraction of each training class")
    s.add_argument("--epochs", type=_positive_int, default=None, help="epochs in all (P-DARTS: split over 3 stages)")
    s.add_argument("--batch-size", type=_positive_int, default=None, help="images per step over all processes")
    s.add_argument("--lr", type=float, default=None, help="weight learning rate")
    s.add_argument("--arch-lr", type=float, default=None, help="architecture learning rate")
    s.add_argument(
        "--lr-warmup-epochs",
        type=int,
        default=None,
        help="epochs of a linear warm-up of --lr before its cosine schedule (PC-DARTS on ImageNet: 5)",
    )
    s.add_argument(
        "--warmup-epochs",
        type=int,
        default=None,
        help="epochs before the architecture learns (PC-DARTS; P-DARTS per stage)",
    )
    s.add_argument(
        "--layers", type=_positive_int, default=None, help="cells (P-DARTS: of the first stage; nb201: cells per stage)"
    )
    s.add_argument("--init-channels", type=_positive_int, default=None, help="channels of the first cells")
    s.add_argument("--partial-channels", type=_positive_int, default=None, help="PC-DARTS K")
    s.add_argument("--image-size", type=_positive_int, default=None, help="side of the (square) input images")
    s.add_argument(
        "--amend-coefficient",
        type=float,
        default=None,
        help="amended-darts: eta, the weight of the amending term (the paper's 0.1)",
    )
    s.add_argument(
        "--latency-model",
        metavar="FILE",
        default=None,
        help="la-darts: the latency predictor (made by fastnas latency-model)",
    )
    s.add_argument(
        "--latency-weight",
        type=float,
        default=None,
        help="la-darts: lambda, the weight of the predicted latency in milliseconds (default 0.01)",
    )
    s.add_argument(
        "--activations",
        type=_name_list,
        default=None,
        metavar="A,B,...",
        help="scalable-darts: the activation factor (default: relu,relu6,elu,leaky_relu,swish; also hardswish)",
    )
    s.add_argument(
        "--gdas-form",
        choices=("sum", "one"),
        default=None,
        help="gdas: an edge's hard sample plus its other hard weights (sum: AutoDL's NAS-Bench-201 GDAS, the "
        "nb201 default) or alone (one: AutoDL's NASNet-space GDAS, the darts default)",
    )
    s.add_argument(
        "--arch-grad-clip",
        type=float,
        default=None,
        help="clip the architecture's gradient to this norm (default: p-darts 5, pc-darts on imagenet 5, else none)",
    )
    s.add_argument(
        "--skip-drop",
        type=_rate_list,
        default=None,
        metavar="P1,P2,P3",
        help="p-darts: initial skip-connect dropout of each stage (default 0.1,0.4,0.7, the released code's "
        "command; the paper's: 0.0,0.4,0.7 on cifar10, 0.1,0.2,0.3 on cifar100)",
    )
    s.add_argument(
        "--label-smoothing",
        type=float,
        default=None,
        help="spos: label smoothing of the supernet's training loss (default 0.1)",
    )
    s.add_argument("--device", choices=("cpu", "cuda"), default=None, help="where to run (default: cpu)")
    s.add_argument("--amp", choices=AMP_DTYPES, default=None, help="mixed precision (fp16 uses loss scaling on CUDA)")
    s.add_argument("--backend", default=None, help="fused-op backend: auto, reference, cpu, cuda, triton")
    s.add_argument(
        "--memory",
        choices=MEMORY_MODES,
        default=None,
        help="what each edge keeps for backward: save (pre-BN tensors only; default), recompute "
        "(nothing, recomputed inside the fused backward), checkpoint (eager modules under "
        "torch.utils.checkpoint), sum (eager modules, only the weighted sum fused)",
    )
    s.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="capture the search step once per epoch as a CUDA graph and replay it (default: on CUDA, "
        "wherever capture works)",
    )
    s.add_argument("--weight-decay", type=float, default=None, help="SGD weight decay of the weights")
    s.add_argument("--train-portion", type=float, default=None, help="share of the training images the weights see")
    s.add_argument(
        "--bn-affine",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="affine batch norms inside the candidates (default: off)",
    )
    s.add_argument(
        "--bn-track",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="batch norms keep running statistics (default: on; oneshot: off, batch statistics)",
    )
    s.add_argument(
        "--path-dropout",
        type=float,
        default=None,
        help="spos/fairnas: drop probability of each sampled candidate, rising linearly from 0; oneshot: r, "
        "the end probability that all k inputs of a node go (each r^(1/k))",
    )
    s.add_argument("--ghost-batch-size", type=_positive_int, default=None, help="oneshot: images per ghost batch")
    s.add_argument(
        "--global-dropout",
        type=float,
        default=None,
        help="nb201, single-path methods: dropout of the pooled features before the classifier (Yu et al.)",
    )
    s.add_argument(
        "--layer-path-dropout",
        type=float,
        default=None,
        help="nb201, single-path methods: r; the output of cell l of L (reductions counted) is dropped per image "
        "with probability r (l + 1) / L (Yu et al.'s path dropout, not ramped over epochs)",
    )
    s.add_argument(
        "--ops-on-nodes",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="nb201, single-path methods: a node's edges from nodes 2, ... run the candidates of its edge from "
        "node 1 (Yu et al.'s op_on_node; default: off, every edge its own)",
    )
    s.add_argument(
        "--ofa-kernel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="nb201, single-path methods: nor_conv_1x1 is the centre of nor_conv_3x3's kernel times a learned "
        "factor, with one batch norm (OFA's kernel transformation, as Yu et al.; default: off)",
    )
    s.add_argument(
        "--constraint",
        choices=("params", "flops"),
        default=None,
        help="spos: sample only architectures whose stand-alone network's parameters or FLOPs "
        "(multiply-adds per image) lie within --constraint-min/--constraint-max",
    )
    s.add_argument("--constraint-min", type=float, default=None, help="lower end of the --constraint range")
    s.add_argument("--constraint-max", type=float, default=None, help="upper end of the --constraint range")
    s.add_argument(
        "--workers",
        type=int,
        default=None,
        help="data-loader worker processes per process (default: 0 for digits and CIFAR, held in memory; "
        "for an image folder the cores less one, at most 12)",
    )
    s.add_argument(
        "--decode",
        choices=("cpu", "cuda", "dali"),
        default=None,
        help="who decodes an image folder's JPEGs: cpu (Pillow in the workers; default), cuda "
        "(torchvision.io.decode_jpeg on the GPU) or dali (NVIDIA DALI, if installed)",
    )
    s.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="CPU threads of torch (default: 1 for digits, else torch's choice)",
    )
    s.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    s.add_argument("--out", metavar="DIR", default=None, help="output folder (default: runs/<method>-<dataset>)")
    s.add_argument(
        "--tensorboard",
        metavar="DIR",
        default=None,
        help="also write each epoch's losses, accuracies and architecture weights as TensorBoard event files to DIR "
        "(needs the tensorboard package)",
    )
    s.add_argument("--resume", metavar="DIR", default=None, help="continue the search whose checkpoint is in DIR")
    s.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines")

    _add_select_parser(sub)
    _add_train_parser(sub)
    _add_rank_eval_parser(sub)
    _add_latency_parser(sub)
    plot = sub.add_parser(
        "plot",
        help="draw a search's curves.png and arch_weights.png again from its log.jsonl",
        description="Draw curves.png (loss and accuracy per epoch) and arch_weights.png (every edge's "
        "architecture weights per epoch) of a search's output folder again, from its log.jsonl; a search "
        "writes them itself after every epoch.",
    )
    plot.add_argument("run", metavar="RUN_DIR", help="the output folder of fastnas search")
    sub.add_parser("bench-step", help="time one search step (see fastnas bench-step --help)", add_help=False)
    sub.add_parser("info", help="versions and available backends", add_help=False)
    return parser


SELECT_DESCRIPTION = """\
Search over the supernet a spos, fairnas or oneshot search trained (RUN_DIR,
its output folder). Every candidate is scored by the supernet running its path
on the search's validation half, after batch-norm recalibration (statistics
reset, then estimated on --bn-images training images, SPOS' 20,000, or all of
a smaller training half; or on --bn-batches batches). --strategy random scores
--candidates random architectures; --strategy evolution is SPOS' (population
50, 20 generations, the 10 best breed 25 mutations with per-gene probability
0.1 and 25 crossovers). --constraint keeps only architectures whose
stand-alone network (the one fastnas train builds) has at most
--constraint-max parameters, FLOPs (multiply-adds per image) or milliseconds
of measured latency (and at least --constraint-min).

Writes select-<strategy>.json (every candidate, ranked), genotype.json (the
best) and cells.png to RUN_DIR (or --out); fastnas train RUN_DIR trains it.
"""

RANK_EVAL_DESCRIPTION = """\
Measure how well a supernet ranks architectures: N architectures of the space,
drawn uniformly, are trained stand-alone with fastnas train's recipe on a short
schedule (--workers at once, in worker processes) and scored by a supernet
trained with --method; the report gives Kendall's tau, the sparse Kendall tau
of Yu et al. (stand-alone accuracies binned at --threshold, 0.1%; "sparse tau"
as the study's code computes it, "sparse tau-b" per architecture), Spearman's
rho, the top-k overlap and the stand-alone accuracy of the supernet's top 3.

The default runs SPOS on the NAS-Bench-201 space and the bundled digits, on the
CPU, in minutes. --compare SETTING ... trains one supernet per setting and
tabulates the coefficients of each against the same stand-alone results; a
setting is base (the run's own options) or key=value,... of fastnas search's
settings (e.g. bn_track=false, bn_affine=true, method=fairnas, path_dropout=0.2,
warmup_epochs=5, lr=0.05, weight_decay=0, epochs=10, init_channels=4,
layers=2, train_portion=0.5), optionally named name:key=value,...;
--compare alone runs Yu et al.'s heuristics one by one, those that apply to
--space and change the base run (also batch_size=128, layers=2, label
smoothing 0.1, or 0 where the method smooths already; on nb201
global_dropout=0.2, layer_path_dropout=0.2, ops_on_nodes=true, ofa_kernel=true).

With --benchmark FILE (the NAS-Bench-201 benchmark file, nb201 space) nothing
is trained stand-alone: the accuracies are the benchmark's (default: cifar10-valid,
validation accuracy after 200 epochs, mean over its trials; --benchmark-dataset,
--benchmark-set, --benchmark-epochs pick another).

Writes to --out: standalone.json (reused by later runs with the same
architectures and recipe), supernet-<setting>/ (each search's folder),
pairs-<setting>.json, scatter-<setting>.png, report.json and table.md.
"""


def _add_select_parser(sub) -> None:
    from fastnas.search.selection import STRATEGIES

    p = sub.add_parser(
        "select",
        help="search over a trained supernet (spos, fairnas, oneshot)",
        description=SELECT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN_DIR", help="the output folder of a spos, fairnas or oneshot search")
    p.add_argument("--strategy", choices=STRATEGIES, default="evolution", help="random or evolution (default)")
    p.add_argument("--candidates", type=_positive_int, default=1000, help="random: architectures scored (1000)")
    p.add_argument("--population", type=_positive_int, default=50, help="evolution: population (50)")
    p.add_argument("--generations", type=_positive_int, default=20, help="evolution: generations (20)")
    p.add_argument("--parents", type=_positive_int, default=10, help="evolution: the best that breed (10)")
    p.add_argument("--mutations", type=int, default=25, help="evolution: mutations per generation (25)")
    p.add_argument("--mutation-prob", type=float, default=0.1, help="evolution: per-gene mutation probability")
    p.add_argument("--crossovers", type=int, default=25, help="evolution: crossovers per generation (25)")
    p.add_argument("--constraint", choices=("params", "flops", "latency"), default=None, help="what to limit")
    p.add_argument("--constraint-max", type=float, default=None, help="at most this many parameters, FLOPs or ms")
    p.add_argument("--constraint-min", type=float, default=None, help="at least this many")
    p.add_argument(
        "--bn-images",
        type=_positive_int,
        default=None,
        help="training images of the recalibration (SPOS' 20000, capped by the training half)",
    )
    p.add_argument("--bn-batches", type=int, default=None, help="training batches of the recalibration instead")
    p.add_argument(
        "--bn-momentum",
        type=float,
        default=None,
        help="recalibrate with this batch-norm momentum (SPOS' code: 0.1) instead of a cumulative average",
    )
    p.add_argument("--val-images", type=_positive_int, default=None, help="score on this many validation images")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: 1 for digits)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder (default: RUN_DIR)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_benchmark_options(p, "the best architecture's accuracy there")


def _add_rank_eval_parser(sub) -> None:
    from fastnas.search.config import DATASETS, SPACES
    from fastnas.search.methods import REGISTRY

    methods = [name for name, m in REGISTRY.items() if not m.trains_architecture]
    r = sub.add_parser(
        "rank-eval",
        help="measure how well a supernet ranks architectures",
        description=RANK_EVAL_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("--method", choices=methods, default="spos", help="supernet training (default: spos)")
    r.add_argument("--space", choices=SPACES, default="nb201", help="search space (default: nb201)")
    r.add_argument("--dataset", choices=DATASETS, default="digits", help="dataset (default: digits, bundled)")
    r.add_argument("--data", metavar="PATH", default=None, help="folder of the cifar10/cifar100/imagenet files")
    r.add_argument("--architectures", type=_positive_int, default=30, help="architectures to rank (30)")
    r.add_argument("--standalone-epochs", type=_positive_int, default=8, help="stand-alone training epochs (8)")
    r.add_argument(
        "--standalone-channels", type=_positive_int, default=None, help="C of the stand-alone networks (digits: 8)"
    )
    r.add_argument(
        "--standalone-layers", type=_positive_int, default=None, help="cells of the stand-alone networks (digits: 1)"
    )
    r.add_argument("--epochs", type=_positive_int, default=None, help="supernet epochs (default: the method's)")
    r.add_argument("--workers", type=_positive_int, default=None, help="stand-alone trainings at once (cores, <= 4)")
    r.add_argument("--bn-batches", type=int, default=10, help="training batches of each recalibration (10)")
    r.add_argument("--threshold", type=float, default=0.001, help="bin width of the sparse Kendall tau (0.001)")
    r.add_argument("--top-k", type=_positive_int, default=5, help="k of the top-k overlap (5)")
    _add_benchmark_options(r, "its accuracies instead of stand-alone training")
    r.add_argument(
        "--compare", nargs="*", metavar="SETTING", default=None, help="settings to compare (alone: Yu et al.'s)"
    )
    r.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    r.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    r.add_argument("--out", metavar="DIR", default=None, help="output folder (default: runs/rank-eval-...)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_train_parser(sub) -> None:
    from fastnas.train.config import AMP_DTYPES, DATASETS, SPACES

    t = sub.add_parser(
        "train",
        help="train a found architecture from scratch",
        description=TRAIN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument(
        "architecture",
        nargs="?",
        metavar="ARCHITECTURE",
        help="a search's output folder, a genotype JSON file, or a NAS-Bench-201 architecture string",
    )
    t.add_argument("--space", choices=SPACES, default=None, help="the architecture's space (default: what it is)")
    t.add_argument("--dataset", choices=DATASETS, default=None, help="dataset (default: the search's, else digits)")
    t.add_argument("--data", metavar="PATH", default=None, help="folder of the cifar10/cifar100/imagenet files")
    t.add_argument("--fraction", type=float, default=None, help="use this fraction of each training class")
    t.add_argument("--epochs", type=_positive_int, default=None, help="training epochs")
    t.add_argument("--batch-size", type=_positive_int, default=None, help="images per step over all processes")
    t.add_argument("--lr", type=float, default=None, help="initial learning rate")
    t.add_argument("--weight-decay", type=float, default=None, help="SGD weight decay")
    t.add_argument("--init-channels", type=_positive_int, default=None, help="channels of the first cells (C)")
    t.add_argument("--layers", type=_positive_int, default=None, help="cells (nb201: cells per stage, N)")
    t.add_argument(
        "--auxiliary",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the DARTS auxiliary head after the second reduction (needs 32x32 CIFAR or 224x224 ImageNet images)",
    )
    t.add_argument("--auxiliary-weight", type=float, default=None, help="weight of the auxiliary loss (0.4)")
    t.add_argument("--drop-path-prob", type=float, default=None, help="drop-path probability, reached linearly from 0")
    t.add_argument("--cutout", type=int, default=None, help="side of the cutout square, 0 for none")
    t.add_argument("--image-size", type=_positive_int, default=None, help="side of the (square) input images")
    t.add_argument("--device", choices=("cpu", "cuda"), default=None, help="where to run (default: cpu)")
    t.add_argument("--amp", choices=AMP_DTYPES, default=None, help="mixed precision (fp16 uses loss scaling on CUDA)")
    t.add_argument("--workers", type=int, default=None, help="data-loader worker processes (default: 0)")
    t.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="CPU threads of torch (default: 1 for digits, else torch's choice)",
    )
    t.add_argument("--latency-batch", type=_positive_int, default=None, help="batch of the latency measurement (1)")
    t.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    t.add_argument("--out", metavar="DIR", default=None, help="output folder (default: runs/train-<name>)")
    t.add_argument(
        "--tensorboard",
        metavar="DIR",
        default=None,
        help="also write each epoch's losses and accuracies as TensorBoard event files to DIR (needs tensorboard)",
    )
    t.add_argument("--resume", metavar="DIR", default=None, help="continue the training whose checkpoint is in DIR")
    t.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines")
    _add_benchmark_options(t, "its accuracy of the architecture beside this training's")


LATENCY_DESCRIPTION = """\
Fit the latency predictor of LA-DARTS: sample architectures of the space
uniformly, build each one's evaluation network (the network fastnas train
trains on --dataset), measure its median inference latency on --device after
a warm-up, fit a small multi-layer regressor from the architecture encoding to
the latency on 80% of them and report its mean relative error on the other
20%. Besides the discrete architectures it measures --relaxed-samples relaxed
ones (softmax weights of random logits on every edge, as the search reads),
each labelled with the latency of the genotype it derives, and reports the
held-out error of both kinds. Use the file with fastnas search --method
la-darts --latency-model FILE.

On the CPU the measurement runs on --threads threads (default 1, as the digits
search and training run); the model is only valid for the setting it measured.
"""


def _add_latency_parser(sub) -> None:
    from fastnas.search.latency import DATASET_INPUTS, REPEATS, ROUNDS, SPACES, WARMUP
    from fastnas.train.report import CLOCKS

    m = sub.add_parser(
        "latency-model",
        help="measure sampled architectures and fit LA-DARTS' latency predictor",
        description=LATENCY_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("--space", choices=SPACES, default="darts", help="search space (default: darts)")
    m.add_argument("--dataset", choices=tuple(DATASET_INPUTS), default="digits", help="whose network (digits)")
    m.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to measure (default: cpu)")
    m.add_argument("--samples", type=_positive_int, default=500, help="architectures to measure (default: 500)")
    m.add_argument(
        "--relaxed-samples",
        type=int,
        default=None,
        help="relaxed architectures (random softmax weights on every edge) to measure as the genotype they "
        "derive (default: as many as --samples)",
    )
    m.add_argument("--batch-size", type=_positive_int, default=1, help="images per measured forward (default: 1)")
    m.add_argument("--repeats", type=_positive_int, default=REPEATS, help=f"timed runs per architecture ({REPEATS})")
    m.add_argument("--warmup", type=int, default=WARMUP, help=f"untimed runs first ({WARMUP})")
    m.add_argument(
        "--rounds", type=_positive_int, default=ROUNDS, help=f"passes over all architectures, median taken ({ROUNDS})"
    )
    m.add_argument("--init-channels", type=_positive_int, default=None, help="C of the measured network")
    m.add_argument("--layers", type=_positive_int, default=None, help="cells of the measured network")
    m.add_argument("--image-size", type=_positive_int, default=None, help="side of the measured images")
    m.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: 1)")
    m.add_argument(
        "--clock",
        choices=CLOCKS,
        default="wall",
        help="wall (elapsed time, the default) or cpu (the measuring thread's CPU time: on a busy shared machine, "
        "what an idle one would take; --device cpu with one thread)",
    )
    m.add_argument("--seed", type=int, default=0, help="seed of the sampled architectures and the fit (0)")
    m.add_argument("--out", metavar="FILE", default=None, help="where to write (default: runs/latency-...pt)")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_latency_model(args: argparse.Namespace) -> int:
    import torch

    from fastnas.search import SearchError
    from fastnas.search.latency import describe, fit_latency_model

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SearchError("--device cuda: torch sees no CUDA GPU here")
    if args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.clock == "cpu" and (args.device != "cpu" or torch.get_num_threads() != 1):
        raise SearchError("--clock cpu times one CPU thread: use it with --device cpu and --threads 1")
    out = args.out or os.path.join("runs", f"latency-{args.space}-{args.dataset}-{args.device}.pt")
    network = {k: getattr(args, k) for k in ("init_channels", "layers", "image_size") if getattr(args, k)}
    model = fit_latency_model(
        args.space, args.dataset, args.device, args.samples, args.batch_size, args.seed, network,
        relaxed_samples=args.relaxed_samples, warmup=args.warmup, repeats=args.repeats,
        progress=not args.no_progress, clock=args.clock, rounds=args.rounds,
    )  # fmt: skip
    model.save(out)
    print(describe(model))
    print(f"wrote {out}; use it with: fastnas search --method la-darts --latency-model {shlex.quote(out)}")
    return 0


def _run_plot(args: argparse.Namespace) -> int:
    from fastnas.search import SearchError
    from fastnas.search.plots import redraw

    try:
        written = redraw(args.run)
    except (OSError, ValueError) as exc:
        raise SearchError(f"cannot read the log of {args.run} ({exc})") from None
    if not written:
        raise SearchError(f"{args.run}/log.jsonl holds no epoch yet")
    print("wrote " + ", ".join(os.path.join(args.run, name) for name in written))
    return 0


# CLI option -> SearchConfig field, for the options that describe the search.
_CONFIG_OPTIONS = {
    "tensorboard": "tensorboard",
    "space": "space", "data": "data", "fraction": "fraction", "epochs": "epochs", "batch_size": "batch_size",
    "lr": "lr", "arch_lr": "arch_lr", "warmup_epochs": "warmup_epochs", "layers": "layers",
    "init_channels": "init_channels", "partial_channels": "partial_channels", "image_size": "image_size",
    "device": "device", "amp": "amp", "backend": "backend", "memory": "memory", "workers": "workers", "seed": "seed",
    "cuda_graph": "cuda_graph", "weight_decay": "weight_decay", "train_portion": "train_portion",
    "bn_affine": "bn_affine", "bn_track": "bn_track", "path_dropout": "path_dropout",
    "ghost_batch_size": "ghost_batch_size", "constraint": "constraint", "constraint_min": "constraint_min",
    "global_dropout": "global_dropout", "layer_path_dropout": "layer_path_dropout", "ops_on_nodes": "ops_on_nodes",
    "ofa_kernel": "ofa_kernel",
    "constraint_max": "constraint_max", "amend_coefficient": "amend_coefficient", "latency_model": "latency_model",
    "latency_weight": "latency_weight", "activations": "activations", "gdas_form": "gdas_form",
    "arch_grad_clip": "arch_grad_clip", "label_smoothing": "label_smoothing", "skip_drop": "skip_drop",
    "lr_warmup_epochs": "lr_warmup_epochs", "decode": "decode",
}  # fmt: skip


def _default_out(method: str, dataset: str) -> str:
    base = os.path.join("runs", f"{method}-{dataset}")
    out, n = base, 1
    while os.path.exists(os.path.join(out, "checkpoint.pt")):
        n += 1
        out = f"{base}-{n}"
    return out


def _run_search(args: argparse.Namespace) -> int:
    import torch

    from fastnas.search import SearchConfig, Searcher, SearchError

    options = {field: getattr(args, opt) for opt, field in _CONFIG_OPTIONS.items()}
    progress = not args.no_progress
    if args.resume:
        if args.out and os.path.abspath(args.out) != os.path.abspath(args.resume):
            raise SearchError("--resume continues in its own folder; drop --out or give the same folder")
        overrides = dict(options, method=args.method, dataset=args.dataset)
        searcher = Searcher.resume(args.resume, overrides, progress=progress)
        out = args.resume
    else:
        method, dataset = args.method or "darts", args.dataset or "digits"
        if options["device"] is None:
            options["device"] = "cpu"
        config = SearchConfig.create(method, dataset=dataset, **options)
        out = args.out or _default_out(method, dataset)
        if os.path.exists(os.path.join(out, "checkpoint.pt")):
            raise SearchError(f"{out} already holds a search; continue it with --resume {out}, or choose another --out")
        searcher = Searcher(config, out_dir=out, progress=progress)
    cfg = searcher.config
    threads = args.threads
    if threads is None and cfg.device == "cpu" and cfg.dataset == "digits":
        # The digits network runs thousands of tiny ops per step: threads gain
        # little there and lose a lot when the cores are shared.
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    if _is_main_process() and progress:
        where = f"resuming {out}" if args.resume else f"writing to {out}"
        print(
            f"fastnas search: {cfg.method} on {cfg.dataset} ({cfg.space} space), {cfg.epochs} epochs, "
            f"batch {cfg.batch_size}, {cfg.device}; {where}",
            flush=True,
        )
    result = searcher.run()
    if _is_main_process() and not cfg.search_method.trains_architecture:
        print(f"wrote {out}/checkpoint.pt (the trained supernet), log.jsonl and curves.png")
        print(f"search it: fastnas select {shlex.quote(out)}")
        return 0
    if _is_main_process():
        print(f"genotype: {result.genotype}")
        print(f"wrote {out}/genotype.json, cells.png, arch_weights.png, curves.png, log.jsonl, checkpoint.pt")
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", searcher.dist.world_size))
        print(f"train it from scratch: {_train_command(out, cfg.device, searcher.dist.world_size, per_node)}")
    return 0


def _train_command(out: str, device: str, processes: int, per_node: int | None = None) -> str:
    """The command that trains the architecture a search wrote to ``out``; it reads the rest from the folder.
    With ``per_node`` processes on each node, fewer than ``processes``, the search ran on several nodes."""
    launcher = "fastnas" if processes == 1 else f"torchrun --nproc_per_node {processes} -m fastnas"
    if per_node and per_node < processes:
        launcher = (
            f"torchrun --nnodes {processes // per_node} --nproc_per_node {per_node} "
            "--rdzv_backend c10d --rdzv_endpoint HOST:PORT -m fastnas"
        )
    device_option = " --device cuda" if device.startswith("cuda") else ""
    return f"{launcher} train {shlex.quote(out)}{device_option}"


# CLI option -> TrainConfig field, for the options that describe the training.
_TRAIN_OPTIONS = {
    "tensorboard": "tensorboard",
    "data": "data", "fraction": "fraction", "epochs": "epochs", "batch_size": "batch_size", "lr": "lr",
    "weight_decay": "weight_decay", "init_channels": "init_channels", "layers": "layers", "auxiliary": "auxiliary",
    "auxiliary_weight": "auxiliary_weight", "drop_path_prob": "drop_path_prob", "cutout": "cutout",
    "image_size": "image_size", "device": "device", "amp": "amp", "workers": "workers", "seed": "seed",
    "latency_batch": "latency_batch",
}  # fmt: skip


def _run_train(args: argparse.Namespace) -> int:
    import torch

    from fastnas.train import TrainConfig, Trainer, TrainError, load_architecture
    from fastnas.train.report import format_report

    options = {field: getattr(args, opt) for opt, field in _TRAIN_OPTIONS.items()}
    progress = not args.no_progress
    if args.resume:
        if args.architecture:
            raise TrainError("--resume continues the architecture of its checkpoint; drop ARCHITECTURE")
        if args.out and os.path.abspath(args.out) != os.path.abspath(args.resume):
            raise TrainError("--resume continues in its own folder; drop --out or give the same folder")
        overrides = dict(options, space=args.space, dataset=args.dataset)
        trainer = Trainer.resume(args.resume, overrides, progress=progress)
        out = args.resume
    else:
        if not args.architecture:
            raise TrainError("give the architecture to train: a search's output folder, a genotype file, or a string")
        arch = load_architecture(args.architecture, args.space)
        searched = arch.search or {}
        dataset = args.dataset or searched.get("dataset") or "digits"
        if options["data"] is None and dataset == searched.get("dataset"):
            options["data"] = searched.get("data")
        if options["device"] is None:
            options["device"] = "cpu"
        config = TrainConfig.create(arch.space, dataset, genotype=arch.genotype, **options)
        out = args.out or os.path.join("runs", f"train-{arch.name}")
        if os.path.exists(os.path.join(out, "checkpoint.pt")):
            raise TrainError(
                f"{out} already holds a training; continue it with --resume {out}, or choose another --out"
            )
        trainer = Trainer(config, out_dir=out, progress=progress)
    cfg = trainer.config
    benchmark = None
    if args.benchmark:
        if cfg.space != "nb201":
            raise TrainError(f"--benchmark reads NAS-Bench-201 cells; this is a {cfg.space} architecture")
        # Looked up first: a missing file or cell ends the command before the training, not after.
        benchmark = _benchmark_accuracy(args, cfg.genotype)
    threads = args.threads
    if threads is None and cfg.device == "cpu" and cfg.dataset == "digits":
        # As for the search: tiny convolutions gain little from threads and lose a lot on shared cores.
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    if _is_main_process() and progress:
        where = f"resuming {out}" if args.resume else f"writing to {out}"
        print(
            f"fastnas train: {cfg.space} network on {cfg.dataset}, {cfg.epochs} epochs, batch {cfg.batch_size}, "
            f"{cfg.device}; {where}",
            flush=True,
        )
    result = trainer.run()
    if _is_main_process():
        print(format_report(result.report))
        if benchmark is not None:
            print(f"{benchmark[0]}: {100 * benchmark[1]:.2f}%")
        print(f"wrote {out}/report.json, log.jsonl, checkpoint.pt")
    return 0


def _run_select(args: argparse.Namespace) -> int:
    import torch

    from fastnas.search.selection import SelectSettings, load_supernet, select

    settings = SelectSettings(
        strategy=args.strategy, candidates=args.candidates, population=args.population,
        generations=args.generations, parents=args.parents, mutations=args.mutations,
        mutation_prob=args.mutation_prob, crossovers=args.crossovers, constraint=args.constraint,
        constraint_min=args.constraint_min, constraint_max=args.constraint_max, bn_batches=args.bn_batches,
        val_images=args.val_images, seed=args.seed, bn_momentum=args.bn_momentum,
    )  # fmt: skip
    if args.bn_images is not None:
        settings.bn_images = args.bn_images
    settings.validate()
    supernet = load_supernet(args.run, args.device)
    if args.benchmark and supernet.config.space != "nb201":
        from fastnas.search import SearchError

        raise SearchError(f"--benchmark reads NAS-Bench-201 cells; {args.run} searched {supernet.config.space}")
    if args.benchmark:
        from fastnas.spaces.nb201_benchmark import NB201Benchmark

        NB201Benchmark.check(args.benchmark)  # a missing file or package ends the command before the selection
    threads = args.threads or (1 if supernet.config.dataset == "digits" and args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    out = args.out or args.run
    cfg = supernet.config
    if not args.no_progress:
        print(
            f"fastnas select: {settings.strategy} over the {cfg.method} supernet of {args.run} ({cfg.space} space, "
            f"{cfg.dataset}, trained {supernet.epochs_done} of {cfg.epochs} epochs)",
            flush=True,
        )
    progress = not args.no_progress
    result = select(args.run, settings, out_dir=out, device=args.device, progress=progress, supernet=supernet)
    best = result.best
    print(f"best: {best['description']}")
    print(f"supernet validation accuracy {100 * best['val_acc']:.2f}% ({result.evaluated} architectures scored)")
    if args.benchmark:
        what, accuracy = _benchmark_accuracy(args, best["architecture"])
        print(f"{what}: {100 * accuracy:.2f}%")
    print(f"wrote {out}/" + ", ".join(result.files))
    if os.path.abspath(out) == os.path.abspath(args.run):
        command = _train_command(out, args.device, 1)
    else:
        # The run folder's checkpoint names the data; a separate folder only has the genotype.
        command = _train_command(os.path.join(out, "genotype.json"), args.device, 1) + f" --dataset {cfg.dataset}"
        command += f" --data {shlex.quote(cfg.data)}" if cfg.data else ""
    print(f"train it from scratch: {command}")
    return 0


def _run_rank_eval(args: argparse.Namespace) -> int:
    import torch

    from fastnas.search.rank_eval import RankEvalSettings, Setting, heuristics, rank_eval

    standalone = {}
    if args.standalone_channels:
        standalone["init_channels"] = args.standalone_channels
    if args.standalone_layers:
        standalone["layers"] = args.standalone_layers
    supernet = {"epochs": args.epochs} if args.epochs else {}
    workers = args.workers or max(1, min(4, os.cpu_count() or 1))
    settings = RankEvalSettings(
        method=args.method, space=args.space, dataset=args.dataset, data=args.data,
        architectures=args.architectures, standalone_epochs=args.standalone_epochs, standalone=standalone,
        supernet=supernet, workers=workers, device=args.device, seed=args.seed, bn_batches=args.bn_batches,
        threshold=args.threshold, top_k=args.top_k, benchmark=args.benchmark, benchmark_metric=_benchmark_metric(args),
    )  # fmt: skip
    compare = None
    if args.compare is not None:
        compare = [Setting.parse(text) for text in (args.compare or heuristics(settings))]
    if args.device == "cpu":
        torch.set_num_threads(1)
    out = args.out or os.path.join("runs", f"rank-eval-{args.method}-{args.space}-{args.dataset}")
    if args.benchmark:
        truth = f"accuracies from the benchmark {args.benchmark}"
    else:
        truth = f"{settings.standalone_epochs} stand-alone epochs each ({workers} at once)"
    if not args.no_progress:
        print(
            f"fastnas rank-eval: {settings.architectures} {args.space} architectures, supernet {args.method} on "
            f"{args.dataset}, {truth}; writing to {out}",
            flush=True,
        )
    report = rank_eval(settings, out, compare, progress=not args.no_progress)
    print(report["table"])
    written = "report.json, " + ("" if args.benchmark else "standalone.json, ") + "pairs-*.json, scatter-*.png"
    print(f"wrote {out}/{written}" + (", table.md" if compare else ""))
    return 0


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _reports_errors() -> bool:
    """Whether this process prints why the command stopped: the first process of each node
    under torchrun, so that every node's console says it, and on one node rank 0 alone."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def _rank_note() -> str:
    """Names the rank, as " (rank N)", on every process but rank 0's."""
    return "" if _is_main_process() else f" (rank {os.environ['RANK']})"


def _bench_step(argv: list[str]) -> int:
    try:
        from fastnas.bench import add_bench_step_args, run_bench_step
    except ImportError as exc:
        print(f"fastnas bench-step: the benchmark module is not available ({exc})", file=sys.stderr)
        return EXIT_ERROR
    from fastnas.search import SearchError

    parser = argparse.ArgumentParser(prog="fastnas bench-step", description="Time one full search step; prints JSON.")
    add_bench_step_args(parser)
    try:
        run_bench_step(parser.parse_args(argv))
    except SearchError as exc:
        print(f"fastnas bench-step: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def _info(argv: list[str]) -> int:
    try:
        from fastnas.info import main as info_main
    except ImportError as exc:
        print(f"fastnas info: not available ({exc})", file=sys.stderr)
        return EXIT_ERROR
    return int(info_main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastnas`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # These two own their options; they are imported only when asked for.
    if argv and argv[0] == "bench-step":
        return _bench_step(argv[1:])
    if argv and argv[0] == "info":
        return _info(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from fastnas.data import DatasetError
    from fastnas.search import SearchError
    from fastnas.spaces.nb201_benchmark import BenchmarkError

    errors: tuple = (SearchError, DatasetError, BenchmarkError)
    run = {
        "search": _run_search, "select": _run_select, "rank-eval": _run_rank_eval, "latency-model": _run_latency_model,
        "plot": _run_plot,
    }.get(args.command, _run_search)  # fmt: skip
    if args.command == "train":
        from fastnas.train import TrainError

        errors, run = errors + (TrainError,), _run_train
    try:
        return run(args)
    except errors as exc:
        if _reports_errors():
            print(f"fastnas {args.command}: error{_rank_note()}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        if _reports_errors():
            print(
                f"\nfastnas {args.command}: interrupted{_rank_note()}; the last completed epoch's checkpoint is kept, "
                "continue with --resume <output folder>",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED
