"""Architectures of a search space as gene vectors, for sampling and evolution.

Every vector of the encoding is a valid architecture of its space and every
architecture has exactly one vector, so that drawing each gene uniformly draws
the architectures uniformly, and mutation and crossover (gene by gene) never
leave the space. Each space defines its encoding next to its networks
(``NB201Encoding``, ``DartsEncoding``, ``ShuffleNetEncoding``); a supernet
gives its own with ``net.encoding()``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

Genes = tuple[int, ...]


class Encoding:
    """An architecture space as gene vectors; subclasses define the genes and their meaning."""

    #: The space's name, as ``fastnas search --space`` and ``fastnas train --space`` take it.
    space: str = ""

    def __init__(self, cardinalities: Sequence[int]):
        self.cardinalities: Genes = tuple(int(c) for c in cardinalities)
        if not self.cardinalities or min(self.cardinalities) < 1:
            raise ValueError(f"every gene needs at least one value, got cardinalities {self.cardinalities}")

    def __len__(self) -> int:
        return len(self.cardinalities)

    def size(self) -> int:
        """How many architectures the space holds."""
        total = 1
        for c in self.cardinalities:
            total *= c
        return total

    def check(self, genes) -> Genes:
        genes = tuple(int(g) for g in genes)
        if len(genes) != len(self.cardinalities) or any(not 0 <= g < c for g, c in zip(genes, self.cardinalities)):
            raise ValueError(f"{genes} is not a gene vector of cardinalities {self.cardinalities}")
        return genes

    def sample(self, rng: random.Random) -> Genes:
        """One architecture, uniformly."""
        return tuple(rng.randrange(c) for c in self.cardinalities)

    def mutate(self, genes: Genes, prob: float, rng: random.Random) -> Genes:
        """Each gene redrawn uniformly (possibly to the same value) with probability ``prob`` (SPOS)."""
        return tuple(rng.randrange(c) if rng.random() < prob else g for g, c in zip(genes, self.cardinalities))

    def crossover(self, a: Genes, b: Genes, rng: random.Random) -> Genes:
        """Each gene from either parent with equal probability (SPOS)."""
        return tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b))

    # --- what the genes mean: defined by each space -------------------------------------

    def to_path(self, genes: Genes) -> tuple[tuple[int, ...], ...]:
        """The supernet path that runs this architecture (``SuperNet.set_path``)."""
        raise NotImplementedError

    def to_json(self, genes: Genes) -> dict:
        """The architecture as ``fastnas train`` reads it (the ``genotype.json`` of a search)."""
        raise NotImplementedError

    def from_json(self, data: dict) -> Genes:
        """Inverse of ``to_json``; ValueError for an architecture outside this space."""
        raise NotImplementedError

    def describe(self, genes: Genes) -> str:
        """One line naming the architecture."""
        raise NotImplementedError
