"""``fastnas bench-step``: one full search step timed (``fastnas.bench``, which owns the options)."""

from __future__ import annotations

import argparse
import sys

from fastnas.cli.runs import EXIT_ERROR

NAME = "bench-step"


def add_parser(sub) -> None:
    sub.add_parser(NAME, help="time one search step (see fastnas bench-step --help)", add_help=False)


def main(argv: list[str]) -> int:
    """The command with its own arguments; the benchmark module is imported only when asked for."""
    try:
        from fastnas.bench import add_bench_step_args, run_bench_step
    except ImportError as exc:
        print(f"fastnas {NAME}: the benchmark module is not available ({exc})", file=sys.stderr)
        return EXIT_ERROR
    from fastnas.errors import RunError

    parser = argparse.ArgumentParser(prog=f"fastnas {NAME}", description="Time one full search step; prints JSON.")
    add_bench_step_args(parser)
    try:
        run_bench_step(parser.parse_args(argv))
    except RunError as exc:
        print(f"fastnas {NAME}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0
