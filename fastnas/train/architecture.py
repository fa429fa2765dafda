"""What ``fastnas train`` trains: an architecture read from a search's folder, a genotype file or a string.

A source is one of
- the output folder of ``fastnas search`` (its ``genotype.json``; its
  ``checkpoint.pt`` says which space and dataset were searched),
- a JSON file holding a DARTS genotype (``fastnas.spaces.genotype_to_dict``) or
  a NAS-Bench-201 architecture (``{"arch": "|nor_conv_3x3~0|+|...|"}``),
- a NAS-Bench-201 architecture string.
Every problem is a TrainError that names the source and what is wrong with it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch.nn as nn

from fastnas.errors import TrainError
from fastnas.spaces import REGISTRY, get_space

GENOTYPE_NAME = "genotype.json"


@dataclass
class Architecture:
    """An architecture to train, checked, with where it came from.

    ``genotype`` is its JSON form (see ``TrainConfig.genotype``); ``name`` names
    the default output folder; ``search`` holds the settings of the search that
    found it, when its folder has a readable checkpoint.
    """

    space: str
    genotype: dict
    name: str
    search: dict | None = None


def load_architecture(source: str, space: str | None = None) -> Architecture:
    """Read and check the architecture ``source`` names; ``space``, if given, must be its space."""
    if os.path.isdir(source):
        return _from_run_folder(source, space)
    if os.path.isfile(source):
        return _from_file(source, space, _file_name(source))
    if "~" in source and "|" in source:
        return _checked(source, "nb201", {"arch": source.strip()}, space, "nb201")
    raise TrainError(
        f"{source!r} is neither a file, a folder nor a NAS-Bench-201 architecture string; give the output "
        "folder of a search, a genotype JSON file, or with --space nb201 a string such as '|nor_conv_3x3~0|+|...|'"
    )


def _from_run_folder(folder: str, space: str | None) -> Architecture:
    path = os.path.join(folder, GENOTYPE_NAME)
    if not os.path.isfile(path):
        raise TrainError(
            f"{folder} holds no {GENOTYPE_NAME}; give the output folder of a finished search "
            "(a training continues with --resume)"
        )
    arch = _from_file(path, space, os.path.basename(os.path.normpath(folder)))
    arch.search = _search_settings(folder)
    return arch


def _search_settings(folder: str) -> dict | None:
    """The settings of the search whose checkpoint is in ``folder``, or None if it has none."""
    from fastnas.run import checkpoint as ckpt

    if not os.path.exists(os.path.join(folder, ckpt.CHECKPOINT_NAME)):
        return None
    state = ckpt.load_checkpoint(folder)
    config = state.get("config")
    if not isinstance(config, dict):
        raise TrainError(f"the checkpoint in {folder} has no search settings; give its {GENOTYPE_NAME} instead")
    return config


def _file_name(path: str) -> str:
    """The stem of ``path``, or its folder's name for a search's own genotype.json."""
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem == "genotype":
        parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
        return parent or stem
    return stem


def _from_file(path: str, space: str | None, name: str) -> Architecture:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise TrainError(f"{path} is not valid JSON ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainError(f"cannot read {path} ({exc})") from None
    if isinstance(data, dict):
        for found in REGISTRY.values():
            if found.recognises(data):
                return _checked(path, found.name, data, space, name)
    raise TrainError(
        f"{path} holds neither a DARTS genotype (keys normal, normal_concat, reduce, reduce_concat) nor a "
        'NAS-Bench-201 architecture ({"arch": "|nor_conv_3x3~0|+|...|"})'
    )


def _checked(where: str, found: str, data: dict, space: str | None, name: str) -> Architecture:
    if space is not None and space != found:
        raise TrainError(
            f"{where} holds {get_space(found).architecture_noun}, but --space {space} was asked for; "
            f"drop --space or give {get_space(space).architecture_noun}"
        )
    try:
        genotype = parse_genotype(found, data)
    except ValueError as exc:
        raise TrainError(f"{where}: {exc}") from None
    return Architecture(space=found, genotype=get_space(found).to_json(genotype), name=name)


def parse_genotype(space: str, data: dict):
    """The architecture of ``space`` that ``data`` holds; ValueError if malformed or its operations unknown."""
    return get_space(space).from_json(data)


def describe(space: str, genotype: dict) -> str:
    """One line naming the architecture, for logs and reports."""
    found = get_space(space)
    return found.describe(found.from_json(genotype))


def build_eval_network(config, num_classes: int, in_channels: int) -> nn.Module:
    """The evaluation network of ``config.genotype``: ``forward(x) -> (logits, auxiliary logits or None)``."""
    space = get_space(config.space)
    return space.build_eval_network(space.from_json(config.genotype), config, num_classes, in_channels)
