"""``fastnas info``: versions and available backends (``fastnas.info``, which owns the options)."""

from __future__ import annotations

import sys

from fastnas.cli.runs import EXIT_ERROR

NAME = "info"


def add_parser(sub) -> None:
    sub.add_parser(NAME, help="versions and available backends", add_help=False)


def main(argv: list[str]) -> int:
    """The command with its own arguments; ``fastnas.info`` is imported only when asked for."""
    try:
        from fastnas.info import main as info_main
    except ImportError as exc:
        print(f"fastnas {NAME}: not available ({exc})", file=sys.stderr)
        return EXIT_ERROR
    return int(info_main(argv) or 0)
