"""The ``fastnas`` command: one module per subcommand, each with ``add_parser(sub)`` and
``run(args)`` (or ``main(argv)`` where it parses its own arguments), listed once below.

``fastnas search`` with no options runs DARTS on scikit-learn's digits on the
CPU in a few minutes, and ends by printing the ``fastnas train`` command that
trains what it found from scratch; ``fastnas search --help`` and
``fastnas train --help`` list the rest. Input errors end with one line on
stderr and a non-zero exit code, never a traceback (``fastnas.cli.runs``).
"""

from __future__ import annotations

import argparse
import sys

from fastnas.cli import bench_step, info, latency_model, plot, rank_eval, runs, search, select, train

# Callers and tests know these by these names.
from fastnas.cli.runs import EXIT_ERROR, EXIT_INTERRUPTED  # noqa: F401
from fastnas.cli.train import train_command as _train_command  # noqa: F401

# The subcommands, in the order --help lists them.
SUBCOMMANDS = {
    module.NAME: module
    for module in (
        search,
        select,
        train,
        rank_eval,
        latency_model,
        plot,
        bench_step,
        info,
    )
}


def build_parser() -> argparse.ArgumentParser:
    from fastnas._version import __version__

    parser = argparse.ArgumentParser(prog="fastnas", description="Fused-kernel weight-sharing architecture search.")
    parser.add_argument("--version", action="version", version=f"fastnas {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for module in SUBCOMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastnas`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = SUBCOMMANDS.get(argv[0]) if argv else None
    if hasattr(command, "main"):
        return command.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return runs.run_command(args.command, SUBCOMMANDS[args.command].run, args)
