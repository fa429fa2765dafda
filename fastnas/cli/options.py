"""The command line's options, read from the config fields that declare them
(``fastnas.run.options``): ``add_options`` turns a dataclass's options into argparse
arguments, every one with default None, and ``given`` turns the parsed arguments back into
the settings the user gave, so that only those override the config's defaults (or, on
``--resume``, the checkpoint's)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from fastnas.run.options import options


def flag(name: str) -> str:
    """The command-line flag of a config field."""
    return "--" + name.replace("_", "-")


def option_help(config_cls, name: str) -> str:
    """The help of one option, its ``{default}`` filled in."""
    default = next(f.default for f in dataclasses.fields(config_cls) if f.name == name)
    return options(config_cls)[name].help.replace("{default}", str(default))


def add_options(parser, config_cls, prefix: Callable[[str], str | None] = lambda name: None) -> None:
    """One argument per option of ``config_cls``, default None (not given); ``prefix(name)``,
    where it returns a text, heads that option's help (e.g. the method that reads it)."""
    for name, spec in options(config_cls).items():
        text = option_help(config_cls, name)
        if prefix(name):
            text = f"{prefix(name)}: {text}"
        kwargs: dict[str, Any] = dict(default=None, help=text)
        if spec.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=spec.type, choices=spec.choices, metavar=spec.metavar)
            kwargs = {k: v for k, v in kwargs.items() if v is not None or k == "default"}
        parser.add_argument(flag(name), **kwargs)


def given(args: argparse.Namespace, config_cls) -> dict[str, Any]:
    """The options of ``config_cls`` that the command line gave, by field name."""
    values = {name: getattr(args, name) for name in options(config_cls)}
    return {name: value for name, value in values.items() if value is not None}
