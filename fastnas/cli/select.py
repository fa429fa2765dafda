"""``fastnas select``: search over the supernet a single-path search trained."""

from __future__ import annotations

import argparse
import os
import shlex

from fastnas.cli import runs
from fastnas.run.options import positive_int

NAME = "select"

DESCRIPTION = """\
Search over the supernet a {supernet_methods} search trained (RUN_DIR,
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


def supernet_methods() -> str:
    """The methods whose search ends with a supernet for select, as "a, b or c"."""
    from fastnas.search.methods import REGISTRY

    names = [m.name for m in REGISTRY.values() if not m.trains_architecture]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)


def add_parser(sub) -> None:
    from fastnas.tools.selection import STRATEGIES

    methods = supernet_methods()
    p = sub.add_parser(
        NAME,
        help=f"search over a trained supernet ({methods.replace(' or ', ', ')})",
        description=DESCRIPTION.format(supernet_methods=methods),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN_DIR", help=f"the output folder of a {methods} search")
    p.add_argument("--strategy", choices=STRATEGIES, default="evolution", help="random or evolution (default)")
    p.add_argument("--candidates", type=positive_int, default=1000, help="random: architectures scored (1000)")
    p.add_argument("--population", type=positive_int, default=50, help="evolution: population (50)")
    p.add_argument("--generations", type=positive_int, default=20, help="evolution: generations (20)")
    p.add_argument("--parents", type=positive_int, default=10, help="evolution: the best that breed (10)")
    p.add_argument("--mutations", type=int, default=25, help="evolution: mutations per generation (25)")
    p.add_argument("--mutation-prob", type=float, default=0.1, help="evolution: per-gene mutation probability")
    p.add_argument("--crossovers", type=int, default=25, help="evolution: crossovers per generation (25)")
    p.add_argument("--constraint", choices=("params", "flops", "latency"), default=None, help="what to limit")
    p.add_argument("--constraint-max", type=float, default=None, help="at most this many parameters, FLOPs or ms")
    p.add_argument("--constraint-min", type=float, default=None, help="at least this many")
    p.add_argument(
        "--bn-images",
        type=positive_int,
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
    p.add_argument("--val-images", type=positive_int, default=None, help="score on this many validation images")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: 1 for digits)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder (default: RUN_DIR)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    runs.add_benchmark_options(p, "the best architecture's accuracy there")


def run(args: argparse.Namespace) -> int:
    from fastnas.cli.train import train_command
    from fastnas.errors import SearchError
    from fastnas.tools.selection import SelectSettings, load_supernet, select

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
    cfg = supernet.config
    if args.benchmark and cfg.space != "nb201":
        raise SearchError(f"--benchmark reads NAS-Bench-201 cells; {args.run} searched {cfg.space}")
    if args.benchmark:
        from fastnas.spaces.nb201.benchmark import NB201Benchmark

        NB201Benchmark.check(args.benchmark)  # a missing file or package ends the command before the selection
    runs.set_threads(args.threads, args.device, cfg.dataset)
    out = args.out or args.run
    progress = not args.no_progress
    if progress:
        print(
            f"fastnas select: {settings.strategy} over the {cfg.method} supernet of {args.run} ({cfg.space} space, "
            f"{cfg.dataset}, trained {supernet.epochs_done} of {cfg.epochs} epochs)",
            flush=True,
        )
    result = select(args.run, settings, out_dir=out, device=args.device, progress=progress, supernet=supernet)
    best = result.best
    print(f"best: {best['description']}")
    print(f"supernet validation accuracy {100 * best['val_acc']:.2f}% ({result.evaluated} architectures scored)")
    if args.benchmark:
        what, accuracy = runs.benchmark_accuracy(args, best["architecture"])
        print(f"{what}: {100 * accuracy:.2f}%")
    print(f"wrote {out}/" + ", ".join(result.files))
    if os.path.abspath(out) == os.path.abspath(args.run):
        command = train_command(out, args.device, 1)
    else:
        # The run folder's checkpoint names the data; a separate folder only has the genotype.
        command = train_command(os.path.join(out, "genotype.json"), args.device, 1) + f" --dataset {cfg.dataset}"
        command += f" --data {shlex.quote(cfg.data)}" if cfg.data else ""
    print(f"train it from scratch: {command}")
    return 0
