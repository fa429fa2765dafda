"""Search spaces: the DARTS and NAS-Bench-201 cell spaces and SPOS' layer-wise ShuffleNet space,
with their evaluation networks.

Every space is a ``SearchSpace`` (``fastnas.spaces.space``) registered below by name;
a new space is one file and one line in ``REGISTRY``.
"""

from fastnas.spaces.darts import (
    DARTS_PRIMITIVES,
    DartsSpace,
    Genotype,
    SearchNetwork,
    genotype_from_dict,
    genotype_to_dict,
    parse_cell,
    plot_genotype,
    validate_genotype,
)
from fastnas.spaces.darts.eval_network import AuxiliaryHeadCIFAR, AuxiliaryHeadImageNet, NetworkCIFAR, NetworkImageNet
from fastnas.spaces.nb201 import NB201_PRIMITIVES, NB201Arch, NB201SearchNetwork, NB201Space, plot_nb201
from fastnas.spaces.nb201.eval_network import NB201Network
from fastnas.spaces.shufflenet import ShuffleNetSpace
from fastnas.spaces.space import SearchSpace

REGISTRY: dict[str, SearchSpace] = {
    space.name: space
    for space in (
        DartsSpace(),
        NB201Space(),
        ShuffleNetSpace(),
    )
}
SPACES = tuple(REGISTRY)


def get_space(name: str) -> SearchSpace:
    """The space called ``name``; ValueError naming the known ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown search space {name!r}; choose one of {', '.join(SPACES)}") from None


__all__ = [
    "REGISTRY",
    "SPACES",
    "SearchSpace",
    "get_space",
    "DARTS_PRIMITIVES",
    "NB201_PRIMITIVES",
    "AuxiliaryHeadCIFAR",
    "AuxiliaryHeadImageNet",
    "Genotype",
    "NB201Arch",
    "NB201Network",
    "NB201SearchNetwork",
    "NetworkCIFAR",
    "NetworkImageNet",
    "SearchNetwork",
    "genotype_from_dict",
    "genotype_to_dict",
    "parse_cell",
    "plot_genotype",
    "plot_nb201",
    "validate_genotype",
]
