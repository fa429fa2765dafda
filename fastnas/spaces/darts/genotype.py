"""DARTS genotypes: the candidates, a found cell pair, its JSON form, its genes and its picture.

The bottom of the DARTS space: the supernet, the evaluation networks and the
space itself read it; it reads nothing of theirs.
"""

from __future__ import annotations

import itertools
from collections import namedtuple
from collections.abc import Sequence

from fastnas.spaces.encoding import Encoding

DARTS_PRIMITIVES = [
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
]

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")
Genotype.__doc__ = """A discrete DARTS cell pair.

``normal`` and ``reduce`` list (op name, input state) per edge, two edges per
intermediate node in node order; states 0 and 1 are the cell inputs and 2 + i
is node i. ``*_concat`` are the states concatenated as the cell output.
"""

CELL_TYPES = ("normal", "reduce")

# --- genotypes --------------------------------------------------------------------


def parse_cell(
    weights: Sequence[Sequence[float]],
    candidates: Sequence[Sequence[str]],
    steps: int = 4,
    exclude: Sequence[str] = ("none",),
) -> list[tuple[str, int]]:
    """Keep the two strongest incoming edges of each node, each with its best candidate.

    An edge's strength is its best candidate weight outside ``exclude``
    (DARTS); ``weights[e][k]`` belongs to ``candidates[e][k]``.
    """
    gene, start = [], 0
    for i in range(steps):
        n = 2 + i
        best = []
        for e in range(start, start + n):
            # -inf marks a candidate removed from the edge (see SearchNetwork.genotype).
            scored = [(w, c) for w, c in zip(weights[e], candidates[e]) if c not in exclude and w != float("-inf")]
            best.append(max(scored, key=lambda t: t[0]) if scored else (float("-inf"), None))
        top = sorted(range(n), key=lambda j: -best[j][0])[:2]
        for j in top:
            if best[j][1] is None:
                raise ValueError(f"node {i}: edge from state {j} has no candidate left outside {list(exclude)}")
            gene.append((best[j][1], j))
        start += n
    return gene


def validate_genotype(genotype: Genotype, steps: int = 4) -> None:
    """Raise ValueError unless ``genotype`` is a well-formed DARTS genotype of ``steps`` nodes."""
    for cell in CELL_TYPES:
        gene = getattr(genotype, cell)
        if len(gene) != 2 * steps:
            raise ValueError(f"genotype.{cell} has {len(gene)} edges; {steps} nodes need {2 * steps}")
        for e, edge in enumerate(gene):
            well_formed = len(edge) == 2 and isinstance(edge[0], str) and type(edge[1]) is int
            if not well_formed:
                raise ValueError(f"genotype.{cell}[{e}] must be (op name, input state), got {edge!r}")
            node = e // 2
            if not 0 <= edge[1] < 2 + node:
                raise ValueError(f"genotype.{cell}[{e}]: node {node} cannot take input state {edge[1]}")
            if edge[0] == "none":
                raise ValueError(f"genotype.{cell}[{e}] uses 'none'")
        concat = list(getattr(genotype, f"{cell}_concat"))
        if not concat or any(not 0 <= int(s) < 2 + steps for s in concat):
            raise ValueError(f"genotype.{cell}_concat {concat} must name states 0..{steps + 1}")


def genotype_to_dict(genotype: Genotype) -> dict:
    """A JSON-able dict of ``genotype``."""
    return {
        "normal": [[op, int(j)] for op, j in genotype.normal],
        "normal_concat": [int(s) for s in genotype.normal_concat],
        "reduce": [[op, int(j)] for op, j in genotype.reduce],
        "reduce_concat": [int(s) for s in genotype.reduce_concat],
    }


def genotype_from_dict(data: dict) -> Genotype:
    """Inverse of ``genotype_to_dict``; raises ValueError on a malformed dict."""
    missing = [k for k in Genotype._fields if k not in data]
    if missing:
        raise ValueError(f"genotype dict lacks {missing}; expected keys {list(Genotype._fields)}")
    try:
        genotype = Genotype(
            normal=[(str(op), int(j)) for op, j in data["normal"]],
            normal_concat=[int(s) for s in data["normal_concat"]],
            reduce=[(str(op), int(j)) for op, j in data["reduce"]],
            reduce_concat=[int(s) for s in data["reduce_concat"]],
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"malformed genotype dict: {exc}") from None
    validate_genotype(genotype, steps=len(genotype.normal) // 2)
    return genotype


# --- architectures as genes -------------------------------------------------------------


class DartsEncoding(Encoding):
    """DARTS genotypes as genes. For each cell type (normal, then reduction) and each node
    i: which two of its 2 + i inputs it takes (one gene over the pairs, lower input
    first), then the operation on each of the two (a gene over the edge's candidates
    other than ``none``). Node i of every cell of a type is the same, as in DARTS."""

    space = "darts"

    def __init__(self, edge_candidates: dict, steps: int = 4, multiplier: int = 4):
        self.steps, self.multiplier = steps, multiplier
        self.candidates = {cell: [list(names) for names in edge_candidates[cell]] for cell in CELL_TYPES}
        k = sum(2 + i for i in range(steps))
        self.pairs = [list(itertools.combinations(range(2 + i), 2)) for i in range(steps)]
        self.ops = {}
        for cell in CELL_TYPES:
            if len(self.candidates[cell]) != k:
                raise ValueError(f"{cell} cells of {steps} nodes have {k} edges, got {len(self.candidates[cell])}")
            ops = [[n for n in names if n != "none"] for names in self.candidates[cell]]
            if len({tuple(o) for o in ops}) != 1 or not ops[0]:
                raise ValueError("every edge must offer the same candidates besides none")
            self.ops[cell] = ops[0]
        cards = []
        for cell in CELL_TYPES:
            for i in range(steps):
                cards += [len(self.pairs[i]), len(self.ops[cell]), len(self.ops[cell])]
        super().__init__(cards)

    def _nodes(self, genes):
        """(cell, node, (input, op), (input, op)) of every node."""
        genes = self.check(genes)
        g = 0
        for cell in CELL_TYPES:
            for i in range(self.steps):
                (j1, j2), a, b = self.pairs[i][genes[g]], genes[g + 1], genes[g + 2]
                yield cell, i, (j1, self.ops[cell][a]), (j2, self.ops[cell][b])
                g += 3

    def to_path(self, genes):
        path = {cell: [()] * len(self.candidates[cell]) for cell in CELL_TYPES}
        for cell, i, *inputs in self._nodes(genes):
            start = sum(2 + n for n in range(i))
            for j, op in inputs:
                path[cell][start + j] = (self.candidates[cell][start + j].index(op),)
        return tuple(path["normal"] + path["reduce"])

    def to_genotype(self, genes) -> Genotype:
        gene = {cell: [] for cell in CELL_TYPES}
        for cell, _i, (j1, a), (j2, b) in self._nodes(genes):
            gene[cell] += [(a, j1), (b, j2)]
        concat = list(range(2 + self.steps - self.multiplier, self.steps + 2))
        return Genotype(normal=gene["normal"], normal_concat=concat, reduce=gene["reduce"], reduce_concat=concat)

    def to_json(self, genes) -> dict:
        return genotype_to_dict(self.to_genotype(genes))

    def from_json(self, data: dict):
        genotype = genotype_from_dict(data)
        genes = []
        for cell in CELL_TYPES:
            gene = getattr(genotype, cell)
            if len(gene) != 2 * self.steps:
                raise ValueError(f"genotype.{cell} has {len(gene)} edges; this space has {self.steps} nodes")
            for i in range(self.steps):
                (a, j1), (b, j2) = sorted(gene[2 * i : 2 * i + 2], key=lambda e: e[1])
                if j1 == j2:
                    raise ValueError(f"genotype.{cell}: node {i} takes state {j1} twice, which this space cannot hold")
                for op in (a, b):
                    if op not in self.ops[cell]:
                        raise ValueError(f"genotype.{cell}: {op!r} is not a candidate of this space {self.ops[cell]}")
                genes += [self.pairs[i].index((j1, j2)), self.ops[cell].index(a), self.ops[cell].index(b)]
        return tuple(genes)

    def describe(self, genes) -> str:
        return str(self.to_genotype(genes))


def plot_genotype(genotype: Genotype, path) -> list:
    """Write a PNG picture of the normal cell above the reduction cell to ``path``.

    Returns the two cells' ``fastnas.spaces.plot.CellGeometry`` (what was drawn where).
    """
    from fastnas.spaces.plot import layout_cell, save_cells

    steps = len(genotype.normal) // 2
    geometries = []
    for cell, title in (("normal", "normal cell"), ("reduce", "reduction cell")):
        gene = getattr(genotype, cell)
        edges = [(j, 2 + pos // 2, op) for pos, (op, j) in enumerate(gene)]
        concat = list(getattr(genotype, f"{cell}_concat"))
        geometries.append(
            layout_cell(title, ["c_{k-2}", "c_{k-1}"], [str(i) for i in range(steps)], edges, concat, "c_{k}")
        )
    save_cells(geometries, path)
    return geometries
