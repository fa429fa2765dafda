"""The NAS-Bench-201 search space (Dong and Yang, 2020).

A cell has 4 nodes; node i takes every earlier node through one edge (6 edges)
and each edge is one of 5 operations, 5**6 = 15,625 architectures. The search
network stacks 3 stages of N cells with ResNet basic blocks between them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastnas.nn.mixed_op import MixedOp
from fastnas.nn.operations import check_primitives, drop_path
from fastnas.nn.supernet import SuperNet, entropy
from fastnas.spaces.nb201.blocks import ResNetBasicBlock
from fastnas.spaces.nb201.genotype import NB201_NODES, NB201_PRIMITIVES, NB201Arch, NB201Encoding, nb201_edges
from fastnas.spaces.nb201.heuristics import layer_drop_probability, share_kernels, share_node_ops


class NB201SearchCell(nn.Module):
    """A NAS-Bench-201 search cell: a mixed op on each of the 6 edges, node sums.

    ``ops_on_nodes`` and ``ofa_kernel``: Yu et al.'s heuristics (``fastnas.spaces.nb201.heuristics``).
    """

    def __init__(
        self,
        C: int,
        primitives: Sequence[str],
        backend: str | None = None,
        max_nodes: int = NB201_NODES,
        affine: bool = False,
        ops_on_nodes: bool = False,
        ofa_kernel: bool = False,
    ):
        super().__init__()
        self.max_nodes = max_nodes
        # NAS-Bench-201 pools without a batch norm after them.
        self.edges = nn.ModuleList(
            MixedOp(C, 1, primitives, affine=affine, pool_bn=False, backend=backend) for _ in nb201_edges(max_nodes)
        )
        if ops_on_nodes:
            share_node_ops(self.edges, nb201_edges(max_nodes))
        if ofa_kernel:
            for edge in {id(e): e for e in self.edges}.values():
                share_kernels(edge)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: Sequence[int] | None = None) -> torch.Tensor:
        nodes = [x]
        e = 0
        for i in range(1, self.max_nodes):
            node = None
            for j in range(i):
                out = self.edges[e](nodes[j], weights[e], None if indices is None else indices[e])
                node = out if node is None else node + out
                e += 1
            nodes.append(node)
        return nodes[-1]


class NB201SearchNetwork(SuperNet):
    """The NAS-Bench-201 supernet: stem, 3 stages of N search cells, residual reductions.

    Args:
        C: channels of the first stage (doubled at each reduction).
        N: search cells per stage.
        num_classes: outputs of the classifier.
        primitives: candidate names of every edge.
        backend: fastnas backend of the fused ops.
        in_channels: channels of the input images.
        affine: affine batch norms inside the candidates (False in search).
        global_dropout, layer_path_dropout, ops_on_nodes, ofa_kernel: Yu et al.'s
            supernet heuristics (``fastnas.spaces.nb201.heuristics``); off by default.

    All cells share one architecture parameter ``alphas`` (6 x candidates), and
    one path entry per edge (``set_path``).
    """

    def __init__(
        self,
        C: int = 16,
        N: int = 5,
        num_classes: int = 10,
        primitives: Sequence[str] = NB201_PRIMITIVES,
        backend: str | None = None,
        in_channels: int = 3,
        affine: bool = False,
        global_dropout: float = 0.0,
        layer_path_dropout: float = 0.0,
        ops_on_nodes: bool = False,
        ofa_kernel: bool = False,
    ):
        super().__init__()
        self.primitives = check_primitives(primitives)
        self.backend = backend
        self.global_dropout = float(global_dropout)
        self.layer_path_dropout = float(layer_path_dropout)
        self.config = dict(
            C=C,
            N=N,
            num_classes=num_classes,
            primitives=list(self.primitives),
            backend=backend,
            in_channels=in_channels,
            affine=affine,
            global_dropout=self.global_dropout,
            layer_path_dropout=self.layer_path_dropout,
            ops_on_nodes=ops_on_nodes,
            ofa_kernel=ofa_kernel,
        )
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        self.cells = nn.ModuleList()
        C_prev = C
        for stage in range(3):
            C_curr = C * 2**stage
            if stage > 0:
                self.cells.append(ResNetBasicBlock(C_prev, C_curr, 2))
            for _ in range(N):
                self.cells.append(
                    NB201SearchCell(
                        C_curr,
                        self.primitives,
                        backend,
                        affine=affine,
                        ops_on_nodes=ops_on_nodes,
                        ofa_kernel=ofa_kernel,
                    )
                )
            C_prev = C_curr
        self.lastact = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU(inplace=False))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        self.alphas = nn.Parameter(1e-3 * torch.randn(len(nb201_edges()), len(self.primitives)))

    def arch_parameters(self) -> list[nn.Parameter]:
        """[alphas]."""
        return [self.alphas]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N, num_classes)."""
        weights, indices = self._edge_weights(self.alphas)
        out = self.stem(x)
        for layer, cell in enumerate(self.cells):
            if isinstance(cell, NB201SearchCell):
                out = cell(out, weights, indices)
                if self.layer_path_dropout > 0 and self.training:
                    out = drop_path(out, self.layer_drop_probability(layer))
            else:
                out = cell(out)
        out = self.global_pooling(self.lastact(out)).flatten(1)
        if self.global_dropout > 0:
            out = F.dropout(out, self.global_dropout, self.training)
        return self.classifier(out)

    def layer_drop_probability(self, layer: int) -> float:
        """The probability that ``layer_path_dropout`` drops an image's output of cell ``layer``
        (an index into ``cells``, residual reductions counted)."""
        return layer_drop_probability(self.layer_path_dropout, layer, len(self.cells))

    def choice_candidates(self) -> list[list[str]]:
        """The candidates of each of the 6 edges (shared by all cells)."""
        return [list(self.primitives) for _ in nb201_edges()]

    def encoding(self) -> NB201Encoding:
        """The cells of this space as gene vectors."""
        return NB201Encoding(self.primitives)

    def choice_nodes(self) -> list[list[int]]:
        """Node i takes edges from every earlier node."""
        nodes, e = [], 0
        for i in range(1, NB201_NODES):
            nodes.append(list(range(e, e + i)))
            e += i
        return nodes

    def arch_weights(self) -> dict[str, torch.Tensor]:
        """{"cell": softmaxed alphas}, detached on the CPU."""
        with torch.no_grad():
            return {"cell": torch.softmax(self.alphas, dim=-1).cpu()}

    def arch_entropy(self) -> dict[str, float]:
        """Mean entropy (nats) of the candidate distribution of the edges."""
        return {"cell": float(entropy(self.arch_weights()["cell"]))}

    def arch_weight_labels(self) -> dict[str, dict]:
        """Each edge's title (source -> target node), candidates, and the edges into each node."""
        edges = nb201_edges()
        groups = [[e for e, (i, _) in enumerate(edges) if i == node] for node in range(1, NB201_NODES)]
        rows = [f"{j} -> {i}" for i, j in edges]
        return {"cell": {"rows": rows, "candidates": [list(self.primitives) for _ in edges], "groups": groups}}

    def genotype(self) -> NB201Arch:
        """The architecture of the strongest candidate per edge (``none`` included, as NAS-Bench-201)."""
        best = self.arch_weights()["cell"].argmax(dim=-1).tolist()
        nodes: list[list[tuple[str, int]]] = [[] for _ in range(NB201_NODES - 1)]
        for e, (i, j) in enumerate(nb201_edges()):
            nodes[i - 1].append((self.primitives[best[e]], j))
        return NB201Arch(nodes)
