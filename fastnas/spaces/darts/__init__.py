"""The DARTS cell space, bottom to top: ``genotype`` (candidates, genotypes, genes, pictures),
``supernet`` (the search network), ``factorized`` (Scalable-DARTS' operators x
activations supernet), ``eval_network`` (the networks a genotype is trained in) and
``space`` (``DartsSpace``, what the registry holds)."""

from fastnas.spaces.darts.genotype import (
    CELL_TYPES,
    DARTS_PRIMITIVES,
    DartsEncoding,
    Genotype,
    genotype_from_dict,
    genotype_to_dict,
    parse_cell,
    plot_genotype,
    validate_genotype,
)
from fastnas.spaces.darts.space import DartsSpace
from fastnas.spaces.darts.supernet import STEMS, SearchNetwork

__all__ = [
    "CELL_TYPES",
    "DARTS_PRIMITIVES",
    "STEMS",
    "DartsEncoding",
    "DartsSpace",
    "Genotype",
    "SearchNetwork",
    "genotype_from_dict",
    "genotype_to_dict",
    "parse_cell",
    "plot_genotype",
    "validate_genotype",
]
