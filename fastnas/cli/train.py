"""``fastnas train``: train a found architecture from scratch; its options are TrainConfig's
(``fastnas.cli.options``)."""

from __future__ import annotations

import argparse
import os
import shlex

from fastnas.cli import runs

NAME = "train"

DESCRIPTION = """\
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


def train_command(out: str, device: str, processes: int, per_node: int | None = None) -> str:
    """The command that trains the architecture a search wrote to ``out``; it reads the rest from the folder.
    With ``per_node`` processes on each node, fewer than ``processes``, the search ran on several nodes."""
    launcher = "fastnas" if processes == 1 else f"torchrun --nproc_per_node {processes} -m fastnas"
    if per_node and per_node < processes:
        launcher = (
            f"torchrun --nnodes {processes // per_node} --nproc_per_node {per_node} "
            "--rdzv_backend c10d --rdzv_endpoint HOST:PORT -m fastnas"
        )
    device_option = " --device cuda" if device.startswith("cuda") else ""
    return f"{launcher} {NAME} {shlex.quote(out)}{device_option}"


def add_parser(sub) -> None:
    from fastnas.cli.options import add_options
    from fastnas.train.config import TrainConfig

    parser = sub.add_parser(
        NAME,
        help="train a found architecture from scratch",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "architecture",
        nargs="?",
        metavar="ARCHITECTURE",
        help="a search's output folder, a genotype JSON file, or a NAS-Bench-201 architecture string",
    )
    add_options(parser, TrainConfig)
    runs.add_threads_option(parser)
    runs.add_run_folder_options(parser, "training", "runs/train-<name>")
    runs.add_benchmark_options(parser, "its accuracy of the architecture beside this training's")


def run(args: argparse.Namespace) -> int:
    from fastnas.cli.options import given
    from fastnas.errors import TrainError
    from fastnas.train import TrainConfig, Trainer, load_architecture
    from fastnas.train.report import format_report

    options = given(args, TrainConfig)
    if args.resume and args.architecture:
        raise TrainError("--resume continues the architecture of its checkpoint; drop ARCHITECTURE")

    def create():
        if not args.architecture:
            raise TrainError("give the architecture to train: a search's output folder, a genotype file, or a string")
        settings = {k: v for k, v in options.items() if k not in ("space", "dataset")}
        arch = load_architecture(args.architecture, args.space)
        searched = arch.search or {}
        dataset = args.dataset or searched.get("dataset") or "digits"
        if args.data is None and dataset == searched.get("dataset") and searched.get("data") is not None:
            settings["data"] = searched["data"]
        settings.setdefault("device", "cpu")
        config = TrainConfig.create(arch.space, dataset, genotype=arch.genotype, **settings)
        return config, args.out or os.path.join("runs", f"{NAME}-{arch.name}")

    trainer, out = runs.open_run(args, "training", TrainError, Trainer, options, create)
    cfg = trainer.config
    benchmark = None
    if args.benchmark:
        if cfg.space != "nb201":
            raise TrainError(f"--benchmark reads NAS-Bench-201 cells; this is a {cfg.space} architecture")
        # Looked up first: a missing file or cell ends the command before the training, not after.
        benchmark = runs.benchmark_accuracy(args, cfg.genotype)
    runs.set_threads(args.threads, cfg.device, cfg.dataset)
    runs.announce(
        args,
        NAME,
        f"{cfg.space} network on {cfg.dataset}, {cfg.epochs} epochs, batch {cfg.batch_size}, {cfg.device}",
        out,
    )
    result = trainer.run()
    if runs.is_main_process():
        print(format_report(result.report))
        if benchmark is not None:
            print(f"{benchmark[0]}: {100 * benchmark[1]:.2f}%")
        print(f"wrote {out}/report.json, log.jsonl, checkpoint.pt")
    return 0
