"""The settings of a run declared once, on the config field each one sets.

A field of ``SearchConfig`` or ``TrainConfig`` is declared with ``option(default, help, ...)``
when the command line sets it (its flag is ``--`` and the field's name with dashes; its
help, type or choices ride along as field metadata) and with ``setting(default)`` when it
does not. ``same_on_resume=True`` marks the fields a resumed run must share with its
checkpoint (``same_on_resume_fields``), or it would compute something else.
``fastnas.cli.options`` turns the declarations into the command line's arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Any

# The field metadata keys.
OPTION = "fastnas.option"
SAME_ON_RESUME = "fastnas.same_on_resume"


@dataclass(frozen=True)
class Option:
    """What the command line needs to know of a config field. ``type=bool`` is a switch
    with its ``--no-`` form; ``{default}`` in ``help`` reads the field's default."""

    help: str
    type: Callable | None = None
    choices: tuple | None = None
    metavar: str | None = None


def setting(default: Any = MISSING, *, same_on_resume: bool = False, default_factory: Any = MISSING) -> Any:
    """A config field the command line does not set."""
    metadata = {SAME_ON_RESUME: same_on_resume}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def option(
    default: Any,
    help: str,
    *,
    same_on_resume: bool = False,
    type: Callable | None = None,
    choices: tuple | None = None,
    metavar: str | None = None,
) -> Any:
    """A config field that ``--<name>`` sets."""
    spec = Option(help, type, tuple(choices) if choices is not None else None, metavar)
    return dataclasses.field(default=default, metadata={SAME_ON_RESUME: same_on_resume, OPTION: spec})


def options(config_cls) -> dict[str, Option]:
    """The fields of ``config_cls`` that the command line sets, in field order, with their options."""
    return {f.name: f.metadata[OPTION] for f in dataclasses.fields(config_cls) if OPTION in f.metadata}


def same_on_resume_fields(config_cls) -> tuple[str, ...]:
    """The fields a resumed run must share with its checkpoint."""
    return tuple(f.name for f in dataclasses.fields(config_cls) if f.metadata.get(SAME_ON_RESUME))


# --- argument types ------------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def name_list(text: str) -> tuple:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def rate_list(text: str) -> tuple:
    try:
        return tuple(float(v) for v in name_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
