"""The DARTS cell space: its supernets, genotypes and evaluation networks behind one ``SearchSpace``."""

from __future__ import annotations

from fastnas.spaces.darts.eval_network import TRAIN_DEFAULTS, NetworkCIFAR, NetworkImageNet, check_eval_genotype
from fastnas.spaces.darts.factorized import FactorizedSearchNetwork
from fastnas.spaces.darts.genotype import (
    DARTS_PRIMITIVES,
    Genotype,
    genotype_from_dict,
    genotype_to_dict,
    plot_genotype,
)
from fastnas.spaces.darts.supernet import SearchNetwork
from fastnas.spaces.space import SearchSpace


class DartsSpace(SearchSpace):
    """The DARTS cell space: a normal and a reduction cell of 4 nodes, 8 candidates per edge."""

    name = "darts"
    title = "DARTS"
    architecture_noun = "a DARTS genotype"

    @property
    def train_defaults(self) -> dict[str, dict]:
        return TRAIN_DEFAULTS

    def build_supernet(self, config, num_classes, in_channels, layers, edge_primitives=None) -> SearchNetwork:
        if config.activations is not None:
            # Scalable-DARTS: the operators x activations supernet.
            return FactorizedSearchNetwork(
                C=config.init_channels,
                num_classes=num_classes,
                layers=layers,
                stem="imagenet" if config.dataset == "imagenet" else "cifar",
                primitives=list(config.primitives or DARTS_PRIMITIVES),
                activations=list(config.activations),
                backend=config.backend,
                in_channels=in_channels,
                memory=config.memory,
                affine=config.bn_affine,
            )
        return SearchNetwork(
            C=config.init_channels,
            num_classes=num_classes,
            layers=layers,
            stem="imagenet" if config.dataset == "imagenet" else "cifar",
            partial_channels=config.partial_channels,
            primitives=list(config.primitives or DARTS_PRIMITIVES),
            backend=config.backend,
            edge_normalization=config.edge_normalization,
            in_channels=in_channels,
            edge_primitives=edge_primitives,
            memory=config.memory,
            affine=config.bn_affine,
        )

    def genotype(self, net, config) -> Genotype:
        return net.genotype(max_skip_connect=config.max_skip_connect)

    def to_json(self, genotype) -> dict:
        return genotype_to_dict(genotype)

    def recognises(self, data: dict) -> bool:
        return any(key in data for key in Genotype._fields)

    def from_json(self, data: dict) -> Genotype:
        genotype = genotype_from_dict(data)
        check_eval_genotype(genotype)
        return genotype

    def plot(self, genotype, path) -> None:
        plot_genotype(genotype, path)

    def build_eval_network(self, genotype, config, num_classes, in_channels):
        network = NetworkImageNet if config.dataset == "imagenet" else NetworkCIFAR
        return network(config.init_channels, num_classes, config.layers, config.auxiliary, genotype, in_channels)
