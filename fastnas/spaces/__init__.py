"""Search spaces: the DARTS cell space and the NAS-Bench-201 cell space, with their evaluation networks."""

from fastnas.spaces.darts import (
    DARTS_PRIMITIVES,
    Genotype,
    SearchNetwork,
    genotype_from_dict,
    genotype_to_dict,
    parse_cell,
    plot_genotype,
    validate_genotype,
)
from fastnas.spaces.darts_eval import AuxiliaryHeadCIFAR, AuxiliaryHeadImageNet, NetworkCIFAR, NetworkImageNet
from fastnas.spaces.nb201 import NB201_PRIMITIVES, NB201Arch, NB201SearchNetwork, plot_nb201
from fastnas.spaces.nb201_eval import NB201Network

__all__ = [
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
