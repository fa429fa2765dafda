"""What the subcommands share: the run folder of a search or training (new, or resumed in its
own folder), CPU threads, the opening line, and how a command ends (errors as one line on
stderr, exit codes, which process of several reports)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from fastnas.run.checkpoint import CHECKPOINT_NAME
from fastnas.run.options import positive_int

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def reports_errors() -> bool:
    """Whether this process prints why the command stopped: the first process of each node
    under torchrun, so that every node's console says it, and on one node rank 0 alone."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def rank_note() -> str:
    """Names the rank, as " (rank N)", on every process but rank 0's."""
    return "" if is_main_process() else f" (rank {os.environ['RANK']})"


def run_command(command: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``run(args)``; an input error ends it with one line on stderr and EXIT_ERROR, Ctrl-C with
    EXIT_INTERRUPTED and where to continue, never a traceback."""
    from fastnas.data import DatasetError
    from fastnas.errors import RunError
    from fastnas.spaces.nb201.benchmark import BenchmarkError

    try:
        return run(args)
    except (RunError, DatasetError, BenchmarkError) as exc:
        if reports_errors():
            print(f"fastnas {command}: error{rank_note()}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        if reports_errors():
            print(
                f"\nfastnas {command}: interrupted{rank_note()}; the last completed epoch's checkpoint is kept, "
                "continue with --resume <output folder>",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED


def add_run_folder_options(parser, what: str, default_out: str) -> None:
    """--out, --resume and --no-progress of a command whose run checkpoints every epoch."""
    parser.add_argument("--out", metavar="DIR", default=None, help=f"output folder (default: {default_out})")
    parser.add_argument("--resume", metavar="DIR", default=None, help=f"continue the {what} whose checkpoint is in DIR")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines")


def add_threads_option(parser) -> None:
    """--threads of a search or training (``set_threads``)."""
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads of torch (default: 1 for digits, else torch's choice)",
    )


def open_run(args: argparse.Namespace, what: str, error: type, runner: type, overrides: dict, create: Callable):
    """The runner (``Searcher`` or ``Trainer``) of this command and its folder: resumed from
    ``--resume DIR`` with ``overrides``, in that folder; else ``create() -> (config, out)``
    in a folder that holds no ``what`` yet."""
    progress = not args.no_progress
    if args.resume:
        if args.out and os.path.abspath(args.out) != os.path.abspath(args.resume):
            raise error("--resume continues in its own folder; drop --out or give the same folder")
        return runner.resume(args.resume, overrides, progress=progress), args.resume
    config, out = create()
    if os.path.exists(os.path.join(out, CHECKPOINT_NAME)):
        raise error(f"{out} already holds a {what}; continue it with --resume {out}, or choose another --out")
    return runner(config, out_dir=out, progress=progress), out


def set_threads(threads: int | None, device: str, dataset: str) -> None:
    """``threads`` CPU threads for torch; not given, one on the digits on the CPU, where a step
    runs thousands of tiny ops that gain little from threads and lose a lot on shared cores."""
    import torch

    if threads is None and device == "cpu" and dataset == "digits":
        threads = 1
    if threads:
        torch.set_num_threads(threads)


def announce(args: argparse.Namespace, command: str, what: str, out: str) -> None:
    """The opening line of a search or training, on the main process, with progress on."""
    if is_main_process() and not args.no_progress:
        where = f"resuming {out}" if args.resume else f"writing to {out}"
        print(f"fastnas {command}: {what}; {where}", flush=True)


# --- NAS-Bench-201 accuracies (select, rank-eval, train) ------------------------------------


def add_benchmark_options(parser, what: str) -> None:
    """--benchmark FILE and which of its accuracies to read (fastnas.spaces.nb201.benchmark)."""
    from fastnas.spaces.nb201.benchmark import DATASETS, EPOCHS, SETS

    parser.add_argument(
        "--benchmark", metavar="FILE", default=None,
        help=f"a NAS-Bench-201 benchmark file (nb201 space; needs pip install nas-bench-201): {what}",
    )  # fmt: skip
    parser.add_argument(
        "--benchmark-dataset", choices=DATASETS, default="cifar10-valid", help="benchmark: dataset (cifar10-valid)"
    )
    parser.add_argument(
        "--benchmark-set", choices=SETS, default="valid", help="benchmark: valid (default) or test accuracy"
    )
    parser.add_argument("--benchmark-epochs", type=int, choices=EPOCHS, default=200, help="benchmark: schedule (200)")


def benchmark_metric(args: argparse.Namespace) -> dict:
    return {"dataset": args.benchmark_dataset, "set": args.benchmark_set, "epochs": args.benchmark_epochs}


def benchmark_accuracy(args: argparse.Namespace, genotype) -> tuple[str, float]:
    """What the benchmark is and its accuracy of one NAS-Bench-201 cell."""
    from fastnas.spaces.nb201.benchmark import BenchmarkMetric, NB201Benchmark

    bench = NB201Benchmark(args.benchmark, BenchmarkMetric(**benchmark_metric(args)))
    return bench.describe(), bench.accuracy(genotype)
