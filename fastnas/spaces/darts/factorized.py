"""The DARTS space with factorised architecture parameters (Scalable-DARTS, Wang et al., 2019).

Every convolution candidate of the DARTS space comes once per activation of a
set (ReLU, ReLU6, ELU, ...), the activation in place of its ReLUs; pools, skip
and none come once. The operator set is the product of two factors, each with
its own architecture parameters per edge: ``alphas_<cell>`` over the DARTS
candidates and ``activation_alphas_<cell>`` over the activations. The weight of
a (convolution, activation) pair is the product of the two softmaxes; the
weight of a pool, skip or none is its operator softmax alone (it sums its
activation factor's, 1). The genotype keeps each edge's best operator by the
operator factor (as DARTS), and for a convolution the edge's best activation,
named ``<operator>_<activation>`` (``sep_conv_3x3_relu6``; the plain name is
ReLU), which the evaluation networks build from ``fastnas.nn.operations.OPS``.

The fused edge computes every (convolution, activation) pair of an edge: the
depthwise prologue applies each activation from one read of the edge input
(``fastnas.ops.multi_depthwise``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from fastnas.nn.cell import num_edges
from fastnas.nn.operations import CONV_PRIMITIVES, with_activation
from fastnas.nn.supernet import entropy
from fastnas.ops.activations import ACTIVATIONS
from fastnas.spaces.darts.genotype import CELL_TYPES, DARTS_PRIMITIVES, Genotype
from fastnas.spaces.darts.supernet import SearchNetwork

# Scalable-DARTS' activation factor: ReLU and the activations the paper pairs with it.
SCALABLE_ACTIVATIONS = ("relu", "relu6", "elu", "leaky_relu", "swish")


def check_activations(activations: Sequence[str]) -> list[str]:
    """``activations`` as a list after checking each is known and none repeats."""
    if isinstance(activations, str):
        raise TypeError(f"activations must be a list of names, not the string {activations!r}")
    names = list(activations)
    if not names:
        raise ValueError("activations is empty; the activation factor needs at least one")
    unknown = [a for a in names if a not in ACTIVATIONS]
    if unknown:
        raise ValueError(f"unknown activation(s) {unknown}; choose from {', '.join(ACTIVATIONS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"activations lists one twice: {names}")
    return names


def factorized_candidates(primitives: Sequence[str], activations: Sequence[str]) -> tuple[list[str], list, list]:
    """The product candidate list of an edge and, per candidate, the index of its operator
    in ``primitives`` and of its activation in ``activations`` (None for one without)."""
    names, operator, activation = [], [], []
    for o, p in enumerate(primitives):
        if p in CONV_PRIMITIVES:
            for a, act in enumerate(activations):
                names.append(with_activation(p, act))
                operator.append(o)
                activation.append(a)
        else:
            names.append(p)
            operator.append(o)
            activation.append(None)
    return names, operator, activation


class FactorizedSearchNetwork(SearchNetwork):
    """The DARTS supernet over operators x activations, with one parameter factor each.

    Args are ``SearchNetwork``'s (full edges only: no partial channels, no
    per-edge candidate lists), plus ``activations``, the activation factor
    (default ``SCALABLE_ACTIVATIONS``).

    Architecture parameters: ``alphas_normal``, ``alphas_reduce`` (edges x
    operators) and ``activation_alphas_normal``, ``activation_alphas_reduce``
    (edges x activations), initialised to 1e-3 * N(0, 1) as DARTS.
    """

    def __init__(
        self,
        C: int = 16,
        num_classes: int = 10,
        layers: int = 8,
        stem: str = "cifar",
        primitives: Sequence[str] = DARTS_PRIMITIVES,
        activations: Sequence[str] = SCALABLE_ACTIVATIONS,
        backend: str | None = None,
        steps: int = 4,
        multiplier: int = 4,
        stem_multiplier: int = 3,
        in_channels: int = 3,
        memory: str = "save",
        affine: bool = False,
    ):
        self.activations = check_activations(activations)
        self.operators = list(primitives)
        names, operator, activation = factorized_candidates(self.operators, self.activations)
        super().__init__(
            C, num_classes, layers, stem, None, names, backend, False, steps, multiplier, stem_multiplier,
            in_channels, None, memory, affine,
        )  # fmt: skip
        k = num_edges(steps)
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(k, len(self.operators)))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(k, len(self.operators)))
        self.activation_alphas_normal = nn.Parameter(1e-3 * torch.randn(k, len(self.activations)))
        self.activation_alphas_reduce = nn.Parameter(1e-3 * torch.randn(k, len(self.activations)))
        # Candidates without an activation read the appended column of ones.
        none = len(self.activations)
        self.register_buffer("operator_index", torch.tensor(operator), persistent=False)
        self.register_buffer(
            "activation_index", torch.tensor([none if a is None else a for a in activation]), persistent=False
        )
        self.config.update(primitives=self.operators, activations=list(self.activations))

    def arch_parameters(self) -> list[nn.Parameter]:
        """[alphas_normal, alphas_reduce, activation_alphas_normal, activation_alphas_reduce]."""
        return [self.alphas_normal, self.alphas_reduce, self.activation_alphas_normal, self.activation_alphas_reduce]

    def factor_groups(self) -> list[list[nn.Parameter]]:
        """The two factors' parameters: [operators], [activations]."""
        return [
            [self.alphas_normal, self.alphas_reduce],
            [self.activation_alphas_normal, self.activation_alphas_reduce],
        ]

    def _weights(self, cell: str, offset: int = 0) -> tuple[torch.Tensor, None]:
        if self.path is not None:
            raise ValueError("the factorised network weighs all its candidates; it takes no single path")
        if self.sampling != "softmax":
            raise ValueError("the factorised network weighs its candidates by softmax only")
        ops = torch.softmax(getattr(self, f"alphas_{cell}"), dim=-1)
        acts = torch.softmax(getattr(self, f"activation_alphas_{cell}"), dim=-1)
        acts = torch.cat([acts, acts.new_ones(acts.shape[0], 1)], dim=1)
        return ops[:, self.operator_index] * acts[:, self.activation_index], None

    def arch_weights(self) -> dict[str, torch.Tensor]:
        """Softmaxed operator factors ("normal", "reduce") and activation factors
        ("activations_normal", "activations_reduce"), detached on the CPU."""
        with torch.no_grad():
            out = {cell: torch.softmax(getattr(self, f"alphas_{cell}"), dim=-1).cpu() for cell in CELL_TYPES}
            for cell in CELL_TYPES:
                out[f"activations_{cell}"] = torch.softmax(getattr(self, f"activation_alphas_{cell}"), dim=-1).cpu()
        return out

    def arch_entropy(self) -> dict[str, float]:
        weights = self.arch_weights()
        return {name: float(entropy(w)) for name, w in weights.items()}

    def _parse_candidates(self, cell: str) -> list[list[str]]:
        return [list(self.operators) for _ in range(num_edges(self.steps))]

    def arch_weight_labels(self) -> dict[str, dict]:
        labels = super().arch_weight_labels()
        for cell in CELL_TYPES:
            labels[f"activations_{cell}"] = dict(
                labels[cell], candidates=[list(self.activations) for _ in range(num_edges(self.steps))]
            )
        return labels

    def _cell_weights(self, cell: str) -> torch.Tensor:
        return self.arch_weights()[cell]

    def edge_activations(self, cell: str) -> list[str]:
        """The strongest activation of each edge of ``cell``."""
        best = self.arch_weights()[f"activations_{cell}"].argmax(dim=-1)
        return [self.activations[int(a)] for a in best]

    def genotype(self, max_skip_connect: int | None = None) -> Genotype:
        """DARTS' genotype of the operator factor, each convolution with its edge's best activation."""
        genotype = super().genotype(max_skip_connect)
        cells = {}
        for cell in CELL_TYPES:
            activations = self.edge_activations(cell)
            gene = []
            for pos, (op, j) in enumerate(getattr(genotype, cell)):
                act = activations[self._edge_index(pos // 2, j)]
                gene.append((with_activation(op, act) if op in CONV_PRIMITIVES else op, j))
            cells[cell] = gene
        return genotype._replace(normal=cells["normal"], reduce=cells["reduce"])


__all__ = ["SCALABLE_ACTIVATIONS", "FactorizedSearchNetwork", "check_activations", "factorized_candidates"]
