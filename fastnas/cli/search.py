"""``fastnas search``: an architecture search; its options are SearchConfig's (``fastnas.cli.options``)."""

from __future__ import annotations

import argparse
import os
import shlex
import textwrap

from fastnas.cli import runs
from fastnas.run.checkpoint import CHECKPOINT_NAME

NAME = "search"

DESCRIPTION = """\
Run a DARTS-family architecture search and write, to the output folder,
genotype.json (the found cells), cells.png (a picture of them), log.jsonl (one
JSON line per epoch) and checkpoint.pt (written atomically after every epoch),
and, redrawn after every epoch, arch_weights.png (every edge's architecture
weights over the epochs) and curves.png (loss and accuracy); fastnas plot
RUN_DIR draws these two again. --tensorboard DIR also writes the epochs'
scalars as TensorBoard event files.

On --dataset digits (the default, bundled, nothing to download) the network
and the run are small: the 8x8 images, 8 initial channels, 5 cells, 3 epochs,
one CPU thread; it takes a few minutes on a laptop CPU. On cifar10, cifar100
and imagenet each method starts from its paper's settings, listed with it
below (some methods adapt them to ImageNet). Any option given on the command
line overrides them.

Several processes: torchrun --nproc_per_node N -m fastnas search ...
(--batch-size is then the total over all processes).

The methods {supernet_methods} train a supernet by paths and no
architecture weights; their output folder holds the trained supernet (checkpoint.pt), and
fastnas select searches over it for the genotype.

On one GPU the whole step (both passes and both optimizer steps) is captured
once per epoch as a CUDA graph and replayed, so the CPU no longer launches its
thousands of small kernels one by one. That is the default wherever capture
works (the methods {captured}; no --amp fp16, {memory} or several processes);
elsewhere the search says in one line why it runs without one.
--no-cuda-graph turns capture off; --cuda-graph insists on it (an error, with
the reason, where it cannot work).
"""


def _join(names) -> str:
    names = list(names)
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)


def _setting(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple | list):
        return ",".join(_setting(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def description() -> str:
    """The description, its methods and spaces read from their registries."""
    from fastnas.search.cuda_graph import UNSUPPORTED_MEMORY
    from fastnas.search.methods import REGISTRY
    from fastnas.spaces import REGISTRY as SPACES

    methods = REGISTRY.values()
    names = dict(
        supernet_methods=_join(m.name for m in methods if not m.trains_architecture),
        captured=_join(m.name for m in methods if not m.cuda_graph_unsupported),
        memory=", ".join(f"--memory {mode}" for mode in UNSUPPORTED_MEMORY),
    )
    # The paragraphs that name methods are filled again around the names.
    paragraphs = [textwrap.fill(p.format(**names), 79) if "{" in p else p for p in DESCRIPTION.split("\n\n")]
    text = "\n\n".join(paragraphs).rstrip("\n") + "\n"
    text += "\nMethods (--method), each with its paper's settings:\n"
    indent = " " * 18
    for m in methods:
        text += f"  {m.name:<16}{m.summary}\n"
        settings = " ".join(f"{k}={_setting(v)}" for k, v in m.defaults.items())
        text += textwrap.fill(settings, 118, initial_indent=indent, subsequent_indent=indent) + "\n"
    text += "\nSpaces (--space), each with the methods that search it:\n"
    for space in SPACES.values():
        searched_by = f"{space.title}: " + ", ".join(m.name for m in methods if space.name in m.spaces)
        text += f"  {space.name:<16}" + textwrap.fill(searched_by, 100, subsequent_indent=indent) + "\n"
    return text


def _option_owner(name: str) -> str | None:
    """The methods that alone read a SearchConfig field (their ``own_options``), for its help."""
    from fastnas.search.methods import REGISTRY

    return ", ".join(m.name for m in REGISTRY.values() if name in m.own_options) or None


def add_parser(sub) -> None:
    from fastnas.cli.options import add_options
    from fastnas.search.config import SearchConfig

    parser = sub.add_parser(
        NAME,
        help="run an architecture search",
        description=description(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(parser, SearchConfig, prefix=_option_owner)
    runs.add_threads_option(parser)
    runs.add_run_folder_options(parser, "search", "runs/<method>-<dataset>")


def default_out(method: str, dataset: str) -> str:
    base = os.path.join("runs", f"{method}-{dataset}")
    out, n = base, 1
    while os.path.exists(os.path.join(out, CHECKPOINT_NAME)):
        n += 1
        out = f"{base}-{n}"
    return out


def run(args: argparse.Namespace) -> int:
    from fastnas.cli.options import given
    from fastnas.cli.train import train_command
    from fastnas.errors import SearchError
    from fastnas.search import SearchConfig, Searcher

    options = given(args, SearchConfig)

    def create():
        options.setdefault("device", "cpu")
        config = SearchConfig.create(**options)
        return config, args.out or default_out(config.method, config.dataset)

    searcher, out = runs.open_run(args, "search", SearchError, Searcher, options, create)
    cfg = searcher.config
    runs.set_threads(args.threads, cfg.device, cfg.dataset)
    runs.announce(
        args,
        NAME,
        f"{cfg.method} on {cfg.dataset} ({cfg.space} space), {cfg.epochs} epochs, batch {cfg.batch_size}, {cfg.device}",
        out,
    )
    result = searcher.run()
    if not runs.is_main_process():
        return 0
    if not cfg.search_method.trains_architecture:
        print(f"wrote {out}/checkpoint.pt (the trained supernet), log.jsonl and curves.png")
        print(f"search it: fastnas select {shlex.quote(out)}")
        return 0
    print(f"genotype: {result.genotype}")
    print(f"wrote {out}/genotype.json, cells.png, arch_weights.png, curves.png, log.jsonl, checkpoint.pt")
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", searcher.dist.world_size))
    print(f"train it from scratch: {train_command(out, cfg.device, searcher.dist.world_size, per_node)}")
    return 0
