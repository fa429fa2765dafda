"""Architectures drawn from a space, uniformly or under a cost constraint, and their costs.

Constraints (``Constraint``) are measured on the network ``fastnas train``
would train, for the search's dataset: its parameters, its FLOPs (multiply-adds
per image, as the NAS papers count them) or its median inference latency. The
single-path searches draw their paths here, and ``fastnas select`` draws its
candidates here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch.nn as nn

from fastnas.data import info_field
from fastnas.errors import SearchError

CONSTRAINT_KINDS = ("params", "flops", "latency")


# --- costs and constraints ------------------------------------------------------------------


class ArchitectureCosts:
    """Parameters, FLOPs (multiply-adds per image) and latency of architectures' stand-alone networks.

    The network is the one ``fastnas train`` builds for ``dataset`` (its defaults,
    at the image size the search ran); each architecture is measured once.
    """

    def __init__(self, encoding, dataset: str, info, device: str = "cpu"):
        self.encoding = encoding
        self.dataset = dataset
        self.info = {k: info_field(info, k) for k in ("num_classes", "in_channels", "image_size")}
        self.device = device
        self._cache: dict[tuple, float] = {}

    def network(self, genes) -> nn.Module:
        from fastnas.train import TrainConfig, build_eval_network

        config = TrainConfig.create(
            self.encoding.space,
            self.dataset,
            genotype=self.encoding.to_json(genes),
            image_size=self.info["image_size"],
            # Costs are the network's that infers: no auxiliary head (nor its image-size limits).
            auxiliary=False,
        )
        return build_eval_network(config, self.info["num_classes"], self.info["in_channels"]).to(self.device)

    def __call__(self, genes, kind: str) -> float:
        key = (tuple(genes), kind)
        if key not in self._cache:
            self._cache[key] = self._measure(genes, kind)
        return self._cache[key]

    def _measure(self, genes, kind: str) -> float:
        from fastnas.train import report

        net = self.network(genes)
        size, channels = self.info["image_size"], self.info["in_channels"]
        if kind == "params":
            return float(report.count_parameters(net)[0])
        if kind == "flops":
            return float(report.count_flops(net, channels, size, self.device) // 2)
        if kind == "latency":
            import contextlib

            measured = report.measure_latency(net, 1, channels, size, self.device, contextlib.nullcontext)
            return float(measured["latency_ms"])
        raise SearchError(f"unknown constraint {kind!r}; choose one of {', '.join(CONSTRAINT_KINDS)}")


@dataclass
class Constraint:
    """``low <= cost(kind) <= high`` (either bound may be None)."""

    kind: str
    low: float | None = None
    high: float | None = None

    def __post_init__(self):
        if self.kind not in CONSTRAINT_KINDS:
            raise SearchError(f"unknown constraint {self.kind!r}; choose one of {', '.join(CONSTRAINT_KINDS)}")
        if self.low is None and self.high is None:
            raise SearchError(f"a constraint on {self.kind} needs a maximum or a minimum")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise SearchError(f"the {self.kind} constraint's minimum {self.low} is above its maximum {self.high}")

    def holds(self, value: float) -> bool:
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)


# Costs outlive a step: one table per (space, candidates, dataset, image size, classes, channels).
_COSTS: dict[tuple, ArchitectureCosts] = {}


def costs_for(encoding, dataset: str, info, device: str = "cpu") -> ArchitectureCosts:
    key = (encoding.space, tuple(encoding.cardinalities), repr(vars(encoding).get("primitives")), dataset, device)
    key += tuple(info_field(info, k) for k in ("num_classes", "in_channels", "image_size"))
    if key not in _COSTS:
        _COSTS[key] = ArchitectureCosts(encoding, dataset, info, device)
    return _COSTS[key]


class ArchitectureSampler:
    """Architectures drawn uniformly, or uniformly under a constraint the SPOS way: a bin of the
    allowed range drawn uniformly (``bins`` equal bins when it has both ends), then architectures
    until one falls in it; after ``tries`` misses, an unconstrained one."""

    def __init__(self, encoding, costs=None, constraint: Constraint | None = None, bins: int = 7, tries: int = 500):
        self.encoding, self.costs, self.constraint = encoding, costs, constraint
        self.bins, self.tries = bins, tries

    @classmethod
    def for_search(cls, config, encoding, info) -> ArchitectureSampler:
        if not config.constraint:
            return cls(encoding)
        constraint = Constraint(config.constraint, config.constraint_min, config.constraint_max)
        return cls(encoding, costs_for(encoding, config.dataset, info), constraint)

    def sample(self, rng: random.Random):
        if self.constraint is None:
            return self.encoding.sample(rng)
        c = self.constraint
        target = c
        if c.low is not None and c.high is not None and self.bins > 1:
            width = (c.high - c.low) / self.bins
            b = rng.randrange(self.bins)
            target = Constraint(c.kind, c.low + b * width, c.low + (b + 1) * width)
        for _ in range(self.tries):
            genes = self.encoding.sample(rng)
            if target.holds(self.costs(genes, c.kind)):
                return genes
        return self.encoding.sample(rng)
