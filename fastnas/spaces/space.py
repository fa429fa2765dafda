"""What a search space is to the rest of fastnas: its supernet, its architectures, its evaluation network.

A space is one class (in the file of its supernet) and one line in the registry of
``fastnas.spaces``. The searchers, ``fastnas train`` and the command line reach
every space through this interface, never by its name.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn as nn


class SearchSpace:
    """A search space; subclasses set the class attributes and implement the methods."""

    name: ClassVar[str] = ""
    #: How the space is called in messages ("DARTS").
    title: ClassVar[str] = ""
    #: What one architecture of the space is called ("a DARTS genotype").
    architecture_noun: ClassVar[str] = ""
    #: ``fastnas train`` settings from the space's papers, per dataset (TrainConfig fields).
    train_defaults: ClassVar[dict[str, dict]] = {}
    #: SearchConfig fields that only this space's supernet reads: every other space
    #: refuses them when they differ from their defaults.
    supernet_options: ClassVar[tuple[str, ...]] = ()

    # --- the search -------------------------------------------------------------------

    def search_layers(self, dataset: str) -> int | None:
        """The supernet's depth (``--layers``) this space searches with on ``dataset``, or None
        for the method's own default."""
        return None

    def build_supernet(
        self, config, num_classes: int, in_channels: int, layers: int, edge_primitives: dict | None = None
    ) -> nn.Module:
        """The supernet ``config`` (a SearchConfig) searches, with ``layers`` cells."""
        raise NotImplementedError

    def validate_search(self, config) -> None:
        """Raise SearchError for a SearchConfig this space's supernet cannot run; by
        default, for the ``supernet_options`` of other spaces."""
        import dataclasses

        from fastnas.errors import SearchError
        from fastnas.spaces import REGISTRY

        defaults = {f.name: f.default for f in dataclasses.fields(config)}
        for other in REGISTRY.values():
            for name in other.supernet_options:
                if name not in self.supernet_options and getattr(config, name) != defaults[name]:
                    option = "--" + name.replace("_", "-")
                    raise SearchError(
                        f"{option} is a setting of the {other.title} supernet, not of the {self.title} one"
                    )

    def genotype(self, net: nn.Module, config):
        """The discrete architecture the supernet ``net`` holds now."""
        return net.genotype()

    # --- architectures --------------------------------------------------------------------

    def to_json(self, genotype) -> dict:
        """A JSON-able dict of an architecture of this space."""
        raise NotImplementedError

    def recognises(self, data: dict) -> bool:
        """Whether the JSON dict ``data`` has the form of this space's architectures."""
        raise NotImplementedError

    def from_json(self, data: dict):
        """The architecture of ``data``; ValueError naming the problem when it is malformed
        or uses operations the evaluation network cannot build."""
        raise NotImplementedError

    def describe(self, genotype) -> str:
        """One line naming an architecture, for logs and reports."""
        return str(genotype)

    def plot(self, genotype, path) -> None:
        """Write a picture of the architecture to ``path`` (PNG)."""
        raise NotImplementedError

    # --- training what a search found ---------------------------------------------------

    def build_eval_network(self, genotype, config, num_classes: int, in_channels: int) -> nn.Module:
        """The evaluation network of ``genotype`` for ``config`` (a TrainConfig):
        ``forward(x) -> (logits, auxiliary logits or None)``."""
        raise NotImplementedError

    def check_train_config(self, config) -> str | None:
        """Why ``config`` (a TrainConfig) cannot train this space's network, or None."""
        return None
