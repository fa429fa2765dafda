"""``fastnas latency-model``: measure sampled architectures and fit LA-DARTS' latency predictor."""

from __future__ import annotations

import argparse
import os
import shlex

from fastnas.run.options import positive_int

NAME = "latency-model"

DESCRIPTION = """\
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


def add_parser(sub) -> None:
    from fastnas.tools.latency_fit import DATASET_INPUTS, REPEATS, ROUNDS, SPACES, WARMUP
    from fastnas.train.report import CLOCKS

    m = sub.add_parser(
        NAME,
        help="measure sampled architectures and fit LA-DARTS' latency predictor",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("--space", choices=SPACES, default="darts", help="search space (default: darts)")
    m.add_argument("--dataset", choices=tuple(DATASET_INPUTS), default="digits", help="whose network (digits)")
    m.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to measure (default: cpu)")
    m.add_argument("--samples", type=positive_int, default=500, help="architectures to measure (default: 500)")
    m.add_argument(
        "--relaxed-samples",
        type=int,
        default=None,
        help="relaxed architectures (random softmax weights on every edge) to measure as the genotype they "
        "derive (default: as many as --samples)",
    )
    m.add_argument("--batch-size", type=positive_int, default=1, help="images per measured forward (default: 1)")
    m.add_argument("--repeats", type=positive_int, default=REPEATS, help=f"timed runs per architecture ({REPEATS})")
    m.add_argument("--warmup", type=int, default=WARMUP, help=f"untimed runs first ({WARMUP})")
    m.add_argument(
        "--rounds", type=positive_int, default=ROUNDS, help=f"passes over all architectures, median taken ({ROUNDS})"
    )
    m.add_argument("--init-channels", type=positive_int, default=None, help="C of the measured network")
    m.add_argument("--layers", type=positive_int, default=None, help="cells of the measured network")
    m.add_argument("--image-size", type=positive_int, default=None, help="side of the measured images")
    m.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: 1)")
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


def run(args: argparse.Namespace) -> int:
    import torch

    from fastnas.errors import SearchError
    from fastnas.tools.latency_fit import describe, fit_latency_model

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
