"""The layer-wise ShuffleNet space of SPOS, bottom to top: ``genotype`` (choices, shapes,
genes), ``blocks`` (the units and the shared skeleton), ``supernet``, ``eval_network``
and ``space`` (``ShuffleNetSpace``)."""

from fastnas.spaces.shufflenet.eval_network import ShuffleNetNetwork
from fastnas.spaces.shufflenet.genotype import NUM_LAYERS, SHUFFLENET_CHOICES, ShuffleNetEncoding, check_blocks
from fastnas.spaces.shufflenet.space import ShuffleNetSpace
from fastnas.spaces.shufflenet.supernet import ShuffleNetSearchNetwork

__all__ = [
    "NUM_LAYERS",
    "SHUFFLENET_CHOICES",
    "ShuffleNetEncoding",
    "ShuffleNetNetwork",
    "ShuffleNetSearchNetwork",
    "ShuffleNetSpace",
    "check_blocks",
]
