"""The NAS-Bench-201 cell space, bottom to top: ``genotype`` (operations, architectures,
genes, pictures), ``blocks`` (the residual block between stages), ``heuristics``
(the supernet-training knobs of the heuristics study), ``supernet`` (the search
network), ``eval_network`` (an architecture trained from scratch), ``benchmark``
(the NAS-Bench-201 file's ground truth) and ``space`` (``NB201Space``)."""

from fastnas.spaces.nb201.blocks import ResNetBasicBlock
from fastnas.spaces.nb201.genotype import (
    NB201_NODES,
    NB201_PRIMITIVES,
    NB201Arch,
    NB201Encoding,
    nb201_edges,
    plot_nb201,
)
from fastnas.spaces.nb201.space import NB201Space
from fastnas.spaces.nb201.supernet import NB201SearchCell, NB201SearchNetwork

__all__ = [
    "NB201_NODES",
    "NB201_PRIMITIVES",
    "NB201Arch",
    "NB201Encoding",
    "NB201SearchCell",
    "NB201SearchNetwork",
    "NB201Space",
    "ResNetBasicBlock",
    "nb201_edges",
    "plot_nb201",
]
