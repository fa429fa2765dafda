"""``fastnas plot``: a search's pictures drawn again from its log."""

from __future__ import annotations

import argparse
import os

NAME = "plot"


def add_parser(sub) -> None:
    p = sub.add_parser(
        NAME,
        help="draw a search's curves.png and arch_weights.png again from its log.jsonl",
        description="Draw curves.png (loss and accuracy per epoch) and arch_weights.png (every edge's "
        "architecture weights per epoch) of a search's output folder again, from its log.jsonl; a search "
        "writes them itself after every epoch.",
    )
    p.add_argument("run", metavar="RUN_DIR", help="the output folder of fastnas search")


def run(args: argparse.Namespace) -> int:
    from fastnas.errors import SearchError
    from fastnas.search.plots import redraw

    try:
        written = redraw(args.run)
    except (OSError, ValueError) as exc:
        raise SearchError(f"cannot read the log of {args.run} ({exc})") from None
    if not written:
        raise SearchError(f"{args.run}/log.jsonl holds no epoch yet")
    print("wrote " + ", ".join(os.path.join(args.run, name) for name in written))
    return 0
