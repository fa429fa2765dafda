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
from fastnas.nn.operations import ReLUConvBN, check_primitives
from fastnas.nn.supernet import SuperNet, entropy
from fastnas.spaces.darts_eval import drop_path
from fastnas.spaces.encoding import Encoding
from fastnas.spaces.nb201_heuristics import SUPERNET_OPTIONS, layer_drop_probability, share_kernels, share_node_ops
from fastnas.spaces.space import SearchSpace

NB201_PRIMITIVES = ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]
NB201_NODES = 4


def nb201_edges(max_nodes: int = NB201_NODES) -> list[tuple[int, int]]:
    """(target node, source node) of every edge, in the order of the weight rows."""
    return [(i, j) for i in range(1, max_nodes) for j in range(i)]


class NB201Arch:
    """A NAS-Bench-201 cell: for each node 1..3, its (op, source node) inputs.

    ``str(arch)`` / ``to_string()`` give the benchmark's format, for example
    ``|nor_conv_3x3~0|+|none~0|skip_connect~1|+|avg_pool_3x3~0|nor_conv_1x1~1|nor_conv_3x3~2|``.
    """

    def __init__(self, nodes: Sequence[Sequence[tuple[str, int]]]):
        self.nodes = tuple(tuple((str(op), int(j)) for op, j in node) for node in nodes)
        for i, node in enumerate(self.nodes, start=1):
            sources = sorted(j for _, j in node)
            if sources != list(range(i)):
                raise ValueError(f"node {i} must take each of nodes 0..{i - 1} once, got sources {sources}")
            for op, _ in node:
                if "~" in op or "|" in op or "+" in op:
                    raise ValueError(f"op name {op!r} cannot contain '~', '|' or '+'")

    def to_string(self) -> str:
        """The NAS-Bench-201 architecture string."""
        return "+".join("|" + "|".join(f"{op}~{j}" for op, j in node) + "|" for node in self.nodes)

    @classmethod
    def from_string(cls, text: str) -> NB201Arch:
        """Parse a NAS-Bench-201 architecture string; raises ValueError if malformed."""
        nodes = []
        for part in text.strip().split("+"):
            if len(part) < 2 or part[0] != "|" or part[-1] != "|":
                raise ValueError(f"malformed NAS-Bench-201 string {text!r}: node {part!r} must be wrapped in '|'")
            node = []
            for item in part[1:-1].split("|"):
                op, sep, j = item.partition("~")
                if not sep or not op or not j.isdigit():
                    raise ValueError(f"malformed NAS-Bench-201 string {text!r}: {item!r} is not 'op~input'")
                node.append((op, int(j)))
            nodes.append(node)
        return cls(nodes)

    def to_dict(self) -> dict:
        """A JSON-able dict: {"arch": string, "nodes": [[[op, input], ...], ...]}."""
        return {"arch": self.to_string(), "nodes": [[[op, j] for op, j in node] for node in self.nodes]}

    @classmethod
    def from_dict(cls, data: dict) -> NB201Arch:
        """Inverse of ``to_dict`` (the string alone is enough)."""
        if "arch" in data:
            return cls.from_string(data["arch"])
        if "nodes" in data:
            return cls(data["nodes"])
        raise ValueError("a NAS-Bench-201 arch dict needs an 'arch' string or a 'nodes' list")

    def __eq__(self, other) -> bool:
        return isinstance(other, NB201Arch) and self.nodes == other.nodes

    def __hash__(self) -> int:
        return hash(self.nodes)

    def __str__(self) -> str:
        return self.to_string()

    def __repr__(self) -> str:
        return f"NB201Arch({self.to_string()!r})"


class NB201Encoding(Encoding):
    """NAS-Bench-201 cells as 6 genes, the candidate index of each edge (in ``nb201_edges`` order)."""

    space = "nb201"

    def __init__(self, primitives: Sequence[str] = NB201_PRIMITIVES):
        self.primitives = list(primitives)
        super().__init__([len(self.primitives)] * len(nb201_edges()))

    def to_path(self, genes):
        return tuple((g,) for g in self.check(genes))

    def to_arch(self, genes) -> NB201Arch:
        nodes: list[list[tuple[str, int]]] = [[] for _ in range(NB201_NODES - 1)]
        for g, (i, j) in zip(self.check(genes), nb201_edges()):
            nodes[i - 1].append((self.primitives[g], j))
        return NB201Arch(nodes)

    def to_json(self, genes) -> dict:
        return {"arch": self.to_arch(genes).to_string()}

    def from_json(self, data: dict):
        arch = NB201Arch.from_dict(data)
        ops = {(i, j): op for i, node in enumerate(arch.nodes, start=1) for op, j in node}
        if set(ops) != set(nb201_edges()):
            raise ValueError(f"{arch.to_string()!r} is not a cell of {NB201_NODES} nodes")
        unknown = sorted({op for op in ops.values() if op not in self.primitives})
        if unknown:
            raise ValueError(f"{arch.to_string()!r} uses {unknown}, not candidates of this space {self.primitives}")
        return tuple(self.primitives.index(ops[e]) for e in nb201_edges())

    def describe(self, genes) -> str:
        return self.to_arch(genes).to_string()


class ResNetBasicBlock(nn.Module):
    """The residual reduction block between NAS-Bench-201 stages (stride 2)."""

    def __init__(self, C_in: int, C_out: int, stride: int = 2):
        super().__init__()
        self.conv_a = ReLUConvBN(C_in, C_out, 3, stride, 1, affine=True)
        self.conv_b = ReLUConvBN(C_out, C_out, 3, 1, 1, affine=True)
        if stride == 2:
            self.downsample = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(C_in, C_out, 1, bias=False))
        elif C_in != C_out:
            self.downsample = ReLUConvBN(C_in, C_out, 1, 1, 0, affine=True)
        else:
            self.downsample = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(x) + self.conv_b(self.conv_a(x))


class NB201SearchCell(nn.Module):
    """A NAS-Bench-201 search cell: a mixed op on each of the 6 edges, node sums.

    ``ops_on_nodes`` and ``ofa_kernel``: Yu et al.'s heuristics (``fastnas.spaces.nb201_heuristics``).
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
            supernet heuristics (``fastnas.spaces.nb201_heuristics``); off by default.

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


def plot_nb201(arch: NB201Arch, path) -> list:
    """Write a PNG picture of the NAS-Bench-201 cell ``arch`` to ``path``.

    Node 0 is the cell's input and the last node its output; ``none`` edges,
    which carry nothing, are left out. Returns the ``fastnas.spaces.plot.CellGeometry``.
    """
    from fastnas.spaces.plot import layout_cell, save_cells

    edges = [(j, i, op) for i, node in enumerate(arch.nodes, start=1) for op, j in node if op != "none"]
    last = len(arch.nodes)
    nodes = [str(i) for i in range(1, last)] + [f"{last} (out)"]
    geometry = layout_cell(f"cell {arch.to_string()}", ["0 (in)"], nodes, edges, [], None)
    save_cells([geometry], path)
    return [geometry]


class NB201Space(SearchSpace):
    """The NAS-Bench-201 cell space: 4 nodes, 6 edges of 5 operations, one cell for the whole network."""

    name = "nb201"
    title = "NAS-Bench-201"
    architecture_noun = "a NAS-Bench-201 architecture"
    supernet_options = SUPERNET_OPTIONS

    @property
    def train_defaults(self) -> dict[str, dict]:
        from fastnas.spaces.nb201_eval import TRAIN_DEFAULTS

        return TRAIN_DEFAULTS

    def validate_search(self, config) -> None:
        from fastnas.search.errors import SearchError
        from fastnas.spaces.nb201_heuristics import OFA_PAIR

        super().validate_search(config)
        for name in ("global_dropout", "layer_path_dropout"):
            if not 0.0 <= getattr(config, name) < 1.0:
                raise SearchError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(config, name)}")
        used = [name for name in self.supernet_options if getattr(config, name)]
        if used and config.search_method.trains_architecture:
            options = ", ".join("--" + name.replace("_", "-") for name in used)
            raise SearchError(
                f"{options}: settings of single-path supernet training (spos, fairnas, oneshot), not {config.method}"
            )
        primitives = config.primitives or NB201_PRIMITIVES
        if config.ofa_kernel and not set(OFA_PAIR) <= set(primitives):
            raise SearchError(f"--ofa-kernel shares the kernels of {' and '.join(OFA_PAIR)}; the candidates lack one")

    def search_layers(self, dataset: str) -> int:
        # NAS-Bench-201 counts cells per stage (N = 5), not cells in all.
        return 1 if dataset == "digits" else 5

    def build_supernet(self, config, num_classes, in_channels, layers, edge_primitives=None) -> NB201SearchNetwork:
        kwargs = {} if config.primitives is None else {"primitives": list(config.primitives)}
        heuristics = {name: getattr(config, name) for name in self.supernet_options}
        return NB201SearchNetwork(
            C=config.init_channels, N=layers, num_classes=num_classes, backend=config.backend,
            in_channels=in_channels, affine=config.bn_affine, **heuristics, **kwargs,
        )  # fmt: skip

    def to_json(self, genotype) -> dict:
        return {"arch": genotype.to_string()}

    def recognises(self, data: dict) -> bool:
        return "arch" in data or "nodes" in data

    def from_json(self, data: dict) -> NB201Arch:
        from fastnas.spaces.nb201_eval import check_eval_arch

        if "arch" in data and not isinstance(data["arch"], str):
            raise ValueError(f"'arch' must be a NAS-Bench-201 string, got {type(data['arch']).__name__}")
        try:
            arch = NB201Arch.from_dict(data)
        except (TypeError, IndexError) as exc:
            raise ValueError(f"malformed NAS-Bench-201 architecture: {exc}") from None
        check_eval_arch(arch)
        return arch

    def describe(self, genotype) -> str:
        return genotype.to_string()

    def plot(self, genotype, path) -> None:
        plot_nb201(genotype, path)

    def build_network(self, genotype, config, num_classes, in_channels):
        from fastnas.spaces.nb201_eval import NB201Network

        return NB201Network(genotype, config.init_channels, config.layers, num_classes, in_channels)

    def check_train_config(self, config) -> str | None:
        if config.auxiliary:
            return "the NAS-Bench-201 network has no auxiliary head; drop --auxiliary"
        return None
