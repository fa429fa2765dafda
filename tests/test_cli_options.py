"""The command line's options, declared once on SearchConfig's and TrainConfig's fields: every one
is in its subcommand's --help and reaches the config; --help's methods and spaces are the registries'."""

import argparse
import dataclasses

import pytest

from fastnas.cli import build_parser, main
from fastnas.cli.options import given
from fastnas.run.options import options, positive_int, same_on_resume_fields
from fastnas.search.config import SearchConfig
from fastnas.search.methods import REGISTRY
from fastnas.spaces import REGISTRY as SPACES
from fastnas.train.config import TrainConfig

SUBCOMMANDS = {"search": SearchConfig, "train": TrainConfig}


def help_text(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def sample(field: dataclasses.Field, spec) -> tuple[list[str], object]:
    """Command-line words that set ``field`` to something other than its default, and that value."""
    flag = "--" + field.name.replace("_", "-")
    if spec.type is bool:
        return ([f"--no-{flag[2:]}"], False) if field.default is True else ([flag], True)
    if spec.choices:
        choice = next(c for c in reversed(spec.choices) if c != field.default)
        return [flag, str(choice)], choice
    text = {positive_int: "3", int: "3", float: "0.25"}.get(spec.type, "relu,swish")
    if spec.type is None:
        text = "some/folder"
    if spec.metavar == "P1,P2,P3":
        text = "0.1,0.2,0.3"
    return [flag, text], (spec.type or str)(text)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_option_is_in_help_and_reaches_the_config(command, capsys):
    config_cls = SUBCOMMANDS[command]
    declared = options(config_cls)
    assert declared, "no options declared"
    text = help_text(command, capsys)
    parser = build_parser()
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for name, spec in declared.items():
        words, value = sample(fields[name], spec)
        assert words[0].replace("--no-", "--") in text, name
        args = parser.parse_args([command, *words])
        settings = given(args, config_cls)
        assert settings == {name: value}, name
        assert getattr(dataclasses.replace(config_cls(), **settings), name) == value, name
    # Nothing given: nothing overrides the config's defaults (nor a checkpoint's, on --resume).
    assert given(parser.parse_args([command]), config_cls) == {}


def test_given_options_make_the_config_the_api_makes():
    args = build_parser().parse_args(["search", "--method", "pc-darts", "--epochs", "2", "--no-bn-track"])
    assert SearchConfig.create(**given(args, SearchConfig)) == SearchConfig.create("pc-darts", epochs=2, bn_track=False)


def test_resume_fields_are_what_the_run_computes():
    search = same_on_resume_fields(SearchConfig)
    assert {"method", "space", "dataset", "epochs", "lr_min", "latency_model_sha256", "world_size"} <= set(search)
    assert not {"device", "workers", "backend", "memory", "cuda_graph", "tensorboard", "data"} & set(search)
    train = same_on_resume_fields(TrainConfig)
    assert {"space", "genotype", "dataset", "epochs", "seed", "world_size"} <= set(train)
    assert not {"device", "workers", "latency_batch", "tensorboard", "data"} & set(train)


def _section(text: str, title: str) -> list[str]:
    lines = text[text.index(title) :].splitlines()[1:]
    block = lines[: lines.index("")]
    return [line.split()[0] for line in block if line.startswith("  ") and not line.startswith("   ")]


def test_search_help_lists_the_registered_methods_and_spaces(capsys):
    text = help_text("search", capsys)
    assert _section(text, "Methods (--method)") == list(REGISTRY)
    for method in REGISTRY.values():
        assert method.summary in text
    assert _section(text, "Spaces (--space)") == list(SPACES)
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    method = next(a for a in sub.choices["search"]._actions if a.dest == "method")
    assert tuple(method.choices) == tuple(REGISTRY)
    # What CUDA graphs cover is read from the methods.
    captured = [m.name for m in REGISTRY.values() if not m.cuda_graph_unsupported]
    paragraph = " ".join(text[text.index("That is the default wherever capture") :].split())
    assert paragraph.startswith(f"That is the default wherever capture works (the methods {', '.join(captured[:-1])}")
