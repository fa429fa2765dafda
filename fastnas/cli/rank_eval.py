"""``fastnas rank-eval``: how well a supernet ranks architectures against their stand-alone accuracies."""

from __future__ import annotations

import argparse
import os

from fastnas.cli import runs
from fastnas.run.options import positive_int

NAME = "rank-eval"

DESCRIPTION = """\
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


def add_parser(sub) -> None:
    from fastnas.search.config import DATASETS, SPACES
    from fastnas.search.methods import REGISTRY

    methods = [name for name, m in REGISTRY.items() if not m.trains_architecture]
    r = sub.add_parser(
        NAME,
        help="measure how well a supernet ranks architectures",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("--method", choices=methods, default="spos", help="supernet training (default: spos)")
    r.add_argument("--space", choices=SPACES, default="nb201", help="search space (default: nb201)")
    r.add_argument("--dataset", choices=DATASETS, default="digits", help="dataset (default: digits, bundled)")
    r.add_argument("--data", metavar="PATH", default=None, help="folder of the cifar10/cifar100/imagenet files")
    r.add_argument("--architectures", type=positive_int, default=30, help="architectures to rank (30)")
    r.add_argument("--standalone-epochs", type=positive_int, default=8, help="stand-alone training epochs (8)")
    r.add_argument(
        "--standalone-channels", type=positive_int, default=None, help="C of the stand-alone networks (digits: 8)"
    )
    r.add_argument(
        "--standalone-layers", type=positive_int, default=None, help="cells of the stand-alone networks (digits: 1)"
    )
    r.add_argument("--epochs", type=positive_int, default=None, help="supernet epochs (default: the method's)")
    r.add_argument("--workers", type=positive_int, default=None, help="stand-alone trainings at once (cores, <= 4)")
    r.add_argument("--bn-batches", type=int, default=10, help="training batches of each recalibration (10)")
    r.add_argument("--threshold", type=float, default=0.001, help="bin width of the sparse Kendall tau (0.001)")
    r.add_argument("--top-k", type=positive_int, default=5, help="k of the top-k overlap (5)")
    runs.add_benchmark_options(r, "its accuracies instead of stand-alone training")
    r.add_argument(
        "--compare", nargs="*", metavar="SETTING", default=None, help="settings to compare (alone: Yu et al.'s)"
    )
    r.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    r.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    r.add_argument("--out", metavar="DIR", default=None, help="output folder (default: runs/rank-eval-...)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import torch

    from fastnas.tools.rank_eval import RankEvalSettings, Setting, heuristics, rank_eval

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
        threshold=args.threshold, top_k=args.top_k, benchmark=args.benchmark,
        benchmark_metric=runs.benchmark_metric(args),
    )  # fmt: skip
    compare = None
    if args.compare is not None:
        compare = [Setting.parse(text) for text in (args.compare or heuristics(settings))]
    if args.device == "cpu":
        torch.set_num_threads(1)
    out = args.out or os.path.join("runs", f"{NAME}-{args.method}-{args.space}-{args.dataset}")
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
