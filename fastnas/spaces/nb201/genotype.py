"""NAS-Bench-201 architectures: the operations, a cell's edges, an architecture, its genes and its picture.

The bottom of the NAS-Bench-201 space: the networks, the benchmark reader and the
space read it; it reads nothing of theirs.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastnas.spaces.encoding import Encoding

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
