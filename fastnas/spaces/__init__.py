"""Search spaces: the DARTS cell space and the NAS-Bench-201 cell space."""

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
from fastnas.spaces.nb201 import NB201_PRIMITIVES, NB201Arch, NB201SearchNetwork, plot_nb201

__all__ = [
    "DARTS_PRIMITIVES",
    "NB201_PRIMITIVES",
    "Genotype",
    "NB201Arch",
    "NB201SearchNetwork",
    "SearchNetwork",
    "genotype_from_dict",
    "genotype_to_dict",
    "parse_cell",
    "plot_genotype",
    "plot_nb201",
    "validate_genotype",
]
