"""The DARTS search space: genotypes and the search network (supernet).

Follows DARTS (Liu et al., 2019), with the partial channels and edge
normalisation of PC-DARTS (Xu et al., 2020), the per-edge candidate subsets and
skip_connect dropout of P-DARTS (Chen et al., 2019) and the hard Gumbel
sampling of GDAS (Dong and Yang, 2019).
"""

from __future__ import annotations

import itertools
from collections import namedtuple
from collections.abc import Sequence

import torch
import torch.nn as nn

from fastnas.nn.cell import Cell, normalize_edge_weights, num_edges
from fastnas.nn.edge_plan import check_memory
from fastnas.nn.mixed_op import checkpoint_module
from fastnas.nn.operations import check_primitives
from fastnas.nn.supernet import SuperNet, entropy
from fastnas.spaces.encoding import Encoding
from fastnas.spaces.space import SearchSpace

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
STEMS = ("cifar", "imagenet")


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


# --- the search network -------------------------------------------------------------


def _stem(kind: str, in_channels: int, C: int, stem_multiplier: int):
    """(stem modules, channels of the two first cell inputs, first cell sees a reduced input)."""
    if kind == "cifar":
        c = stem_multiplier * C
        return nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)), None, c, c, False
    # PC-DARTS ImageNet search: 224 -> 56 (s0) -> 28 (s1), three stride-2 convolutions.
    stem0 = nn.Sequential(
        nn.Conv2d(in_channels, C // 2, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(C // 2),
        nn.ReLU(inplace=False),
        nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(C),
    )
    stem1 = nn.Sequential(
        nn.ReLU(inplace=False),
        nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(C),
    )
    return stem0, stem1, C, C, True


class SearchNetwork(SuperNet):
    """The DARTS supernet: a stem, ``layers`` search cells, global pooling, a classifier.

    Args:
        C: channels of the first cells (doubled at each reduction).
        num_classes: outputs of the classifier.
        layers: cells; reduction cells sit at layers // 3 and 2 * layers // 3.
        stem: "cifar" (3x3 conv + BN) or "imagenet" (three stride-2 convs,
            224x224 -> 28x28, as the PC-DARTS ImageNet search).
        partial_channels: K of PC-DARTS (1/K of the channels through the
            candidates), or None.
        primitives: candidate names of every edge.
        backend: fastnas backend of the fused ops (None: the usual choice).
        edge_normalization: per-edge betas, softmaxed over each node's incoming
            edges, scale the edges before the node sum; None means on exactly
            when ``partial_channels`` is set.
        steps, multiplier, stem_multiplier: as DARTS (4, 4, 3).
        in_channels: channels of the input images.
        edge_primitives: {"normal": [...], "reduce": [...]}, one candidate list
            per edge (P-DARTS stages); every list must have the same length.
            Default: ``primitives`` on every edge.
        memory: "save", "recompute" or "checkpoint", as ``fastnas.nn.MixedOp``
            and ``fastnas.nn.Cell`` take it.
        affine: affine batch norms inside the candidates (False in search).

    Paths (``set_path``) have one entry per edge: the 14 edges of the normal
    cells, then the 14 of the reduction cells, each shared by every cell of its type.

    Architecture parameters: ``alphas_normal`` and ``alphas_reduce``
    (edges x candidates) and, with edge normalisation, ``betas_normal`` and
    ``betas_reduce`` (edges), initialised to 1e-3 * N(0, 1) as DARTS.
    """

    def __init__(
        self,
        C: int = 16,
        num_classes: int = 10,
        layers: int = 8,
        stem: str = "cifar",
        partial_channels: int | None = None,
        primitives: Sequence[str] = DARTS_PRIMITIVES,
        backend: str | None = None,
        edge_normalization: bool | None = None,
        steps: int = 4,
        multiplier: int = 4,
        stem_multiplier: int = 3,
        in_channels: int = 3,
        edge_primitives: dict | None = None,
        memory: str = "save",
        affine: bool = False,
    ):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if layers < 1 or steps < 1 or not 1 <= multiplier <= steps:
            raise ValueError(
                f"need layers >= 1, steps >= 1 and 1 <= multiplier <= steps; got {layers}, {steps}, {multiplier}"
            )
        check_memory(memory)
        self.primitives = check_primitives(primitives)
        self.num_classes = num_classes
        self.layers = layers
        self.steps = steps
        self.multiplier = multiplier
        self.partial_channels = partial_channels
        self.backend = backend
        self.edge_normalization = bool(partial_channels) if edge_normalization is None else bool(edge_normalization)
        self._candidates = self._edge_candidate_lists(edge_primitives)
        self.config = dict(
            C=C, num_classes=num_classes, layers=layers, stem=stem, partial_channels=partial_channels,
            primitives=list(self.primitives), backend=backend, edge_normalization=self.edge_normalization,
            steps=steps, multiplier=multiplier, stem_multiplier=stem_multiplier, in_channels=in_channels,
            edge_primitives=self.edge_candidates(), memory=memory, affine=affine,
        )  # fmt: skip

        self.stem_kind = stem
        self.stem0, self.stem1, C_prev_prev, C_prev, reduction_prev = _stem(stem, in_channels, C, stem_multiplier)
        self.cells = nn.ModuleList()
        C_curr = C
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cell = Cell(
                steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev,
                self._candidates["reduce" if reduction else "normal"], partial_channels, backend, memory, affine,
            )  # fmt: skip
            self.cells.append(cell)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

        k = num_edges(steps)
        n = len(self._candidates["normal"][0])
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(k, n))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(k, n))
        if self.edge_normalization:
            self.betas_normal = nn.Parameter(1e-3 * torch.randn(k))
            self.betas_reduce = nn.Parameter(1e-3 * torch.randn(k))

    def _edge_candidate_lists(self, edge_primitives: dict | None) -> dict[str, list[list[str]]]:
        k = num_edges(self.steps)
        if edge_primitives is None:
            return {cell: [list(self.primitives) for _ in range(k)] for cell in CELL_TYPES}
        if set(edge_primitives) != set(CELL_TYPES):
            raise ValueError(f"edge_primitives needs exactly the keys {CELL_TYPES}, got {sorted(edge_primitives)}")
        lists = {}
        for cell in CELL_TYPES:
            edges = edge_primitives[cell]
            if len(edges) != k:
                raise ValueError(f"edge_primitives[{cell!r}] has {len(edges)} lists; a cell has {k} edges")
            lists[cell] = [check_primitives(names, f"edge_primitives[{cell!r}][{e}]") for e, names in enumerate(edges)]
        sizes = {len(names) for cell in CELL_TYPES for names in lists[cell]}
        if len(sizes) != 1:
            raise ValueError(f"every edge must keep the same number of candidates, got sizes {sorted(sizes)}")
        return lists

    def edge_candidates(self) -> dict[str, list[list[str]]]:
        """The candidate names of every edge, {"normal": [...], "reduce": [...]}."""
        return {cell: [list(names) for names in self._candidates[cell]] for cell in CELL_TYPES}

    def choice_candidates(self) -> list[list[str]]:
        """The candidates of every edge: the normal cells' 14, then the reduction cells'."""
        return [list(names) for cell in CELL_TYPES for names in self._candidates[cell]]

    def encoding(self) -> DartsEncoding:
        """The genotypes of this space as gene vectors."""
        return DartsEncoding(self.edge_candidates(), self.steps, self.multiplier)

    def choice_nodes(self) -> list[list[int]]:
        """Node i of each cell type takes its 2 + i edges; the reduction cells' follow the normal cells'."""
        nodes, e = [], 0
        for _ in CELL_TYPES:
            for i in range(self.steps):
                nodes.append(list(range(e, e + 2 + i)))
                e += 2 + i
        return nodes

    def arch_parameters(self) -> list[nn.Parameter]:
        """[alphas_normal, alphas_reduce] (+ [betas_normal, betas_reduce] with edge normalisation)."""
        params = [self.alphas_normal, self.alphas_reduce]
        if self.edge_normalization:
            params += [self.betas_normal, self.betas_reduce]
        return params

    def _weights(self, cell: str, offset: int = 0) -> tuple[torch.Tensor, list[int] | None]:
        """(edges, candidates) weights of ``cell``'s edges, and the sampled candidates in gumbel mode
        (or a set path's, its entries from ``offset``)."""
        return self._edge_weights(getattr(self, f"alphas_{cell}"), offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N, num_classes)."""
        k = num_edges(self.steps)
        weights = {cell: self._weights(cell, i * k) for i, cell in enumerate(CELL_TYPES)}
        betas = {cell: None for cell in CELL_TYPES}
        if self.edge_normalization and self.path is None:
            betas = {cell: normalize_edge_weights(getattr(self, f"betas_{cell}"), self.steps) for cell in CELL_TYPES}
        s0 = self._stem(self.stem0, x)
        s1 = s0 if self.stem1 is None else self._stem(self.stem1, s0)
        for cell in self.cells:
            kind = "reduce" if cell.reduction else "normal"
            w, indices = weights[kind]
            s0, s1 = s1, cell(s0, s1, w, betas[kind], indices)
        out = self.global_pooling(s1)
        return self.classifier(out.flatten(1))

    def has_unused_parameters(self) -> bool:
        """Whether a cell type is missing (fewer than 3 cells: no normal cell), so that its
        architecture parameters never get a gradient (DistributedDataParallel must look for them)."""
        kinds = {cell.reduction for cell in self.cells}
        return kinds != {False, True}

    def _stem(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A stem part, recomputed in backward under ``memory="recompute"`` as the cells'
        preprocessing is (at 224x224 the ImageNet stem's 112x112 and 56x56 tensors
        would otherwise be most of what a step keeps)."""
        if self.training and torch.is_grad_enabled() and self.cells[0].edges[0].memory == "recompute":
            return checkpoint_module(module, module, x, preserve_rng_state=False)  # no randomness inside
        return module(x)

    def arch_weights(self) -> dict[str, torch.Tensor]:
        """Softmaxed alphas ("normal", "reduce") and per-node softmaxed betas, detached on the CPU."""
        with torch.no_grad():
            out = {cell: torch.softmax(getattr(self, f"alphas_{cell}"), dim=-1).cpu() for cell in CELL_TYPES}
            if self.edge_normalization:
                for cell in CELL_TYPES:
                    out[f"betas_{cell}"] = normalize_edge_weights(getattr(self, f"betas_{cell}"), self.steps).cpu()
        return out

    def arch_entropy(self) -> dict[str, float]:
        """Mean entropy (nats) of the candidate distribution of the edges, per cell type."""
        weights = self.arch_weights()
        return {cell: float(entropy(weights[cell])) for cell in CELL_TYPES}

    def arch_weight_labels(self) -> dict[str, dict]:
        """What the rows and columns of each matrix of ``arch_weights`` are: per key, each
        edge's title (source state -> node, named as in cells.png), its candidates, and the
        edges into each node (``fastnas.search.plots`` draws a node's edges in one row)."""
        states = ["c_{k-2}", "c_{k-1}"] + [str(i) for i in range(self.steps)]
        edges = [(j, i) for i in range(self.steps) for j in range(2 + i)]
        rows = [f"{states[j]} -> {i}" for j, i in edges]
        groups = [[e for e, (_, i) in enumerate(edges) if i == node] for node in range(self.steps)]
        return {
            cell: {"rows": rows, "candidates": self._parse_candidates(cell), "groups": groups} for cell in CELL_TYPES
        }

    def _parse_candidates(self, cell: str) -> list[list[str]]:
        """The candidate names the rows of ``_cell_weights`` belong to, per edge."""
        return self._candidates[cell]

    def _cell_weights(self, cell: str) -> torch.Tensor:
        weights = self.arch_weights()
        w = weights[cell]
        if self.edge_normalization:
            w = w * weights[f"betas_{cell}"].unsqueeze(1)
        return w

    def genotype(self, max_skip_connect: int | None = None) -> Genotype:
        """The discrete architecture: top-2 incoming edges of each node, ``none`` excluded.

        With ``max_skip_connect``, while the normal cell keeps more skip_connects
        than that, the weakest kept skip_connect is removed from its edge and the
        cell parsed again, so that edge falls back to its best other candidate
        or loses its place to a stronger edge (P-DARTS).
        """
        concat = list(range(2 + self.steps - self.multiplier, self.steps + 2))
        reduce = parse_cell(self._cell_weights("reduce").tolist(), self._parse_candidates("reduce"), self.steps)
        w = self._cell_weights("normal").tolist()
        cands = self._parse_candidates("normal")
        normal = parse_cell(w, cands, self.steps)
        if max_skip_connect is not None:
            if max_skip_connect < 0:
                raise ValueError(f"max_skip_connect must be >= 0, got {max_skip_connect}")
            while sum(op == "skip_connect" for op, _ in normal) > max_skip_connect:
                kept = [self._edge_index(pos // 2, j) for pos, (op, j) in enumerate(normal) if op == "skip_connect"]
                weakest = min(kept, key=lambda e: w[e][cands[e].index("skip_connect")])
                w[weakest][cands[weakest].index("skip_connect")] = float("-inf")
                normal = parse_cell(w, cands, self.steps)
        return Genotype(normal=normal, normal_concat=concat, reduce=reduce, reduce_concat=concat)

    def _edge_index(self, node: int, source: int) -> int:
        return sum(2 + i for i in range(node)) + source


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


class DartsSpace(SearchSpace):
    """The DARTS cell space: a normal and a reduction cell of 4 nodes, 8 candidates per edge."""

    name = "darts"
    title = "DARTS"
    architecture_noun = "a DARTS genotype"

    @property
    def train_defaults(self) -> dict[str, dict]:
        from fastnas.spaces.darts_eval import TRAIN_DEFAULTS

        return TRAIN_DEFAULTS

    def build_supernet(self, config, num_classes, in_channels, layers, edge_primitives=None) -> SearchNetwork:
        if config.activations is not None:
            # Scalable-DARTS: the operators x activations supernet.
            from fastnas.spaces.darts_factorized import FactorizedSearchNetwork

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
        from fastnas.spaces.darts_eval import check_eval_genotype

        genotype = genotype_from_dict(data)
        check_eval_genotype(genotype)
        return genotype

    def plot(self, genotype, path) -> None:
        plot_genotype(genotype, path)

    def build_network(self, genotype, config, num_classes, in_channels):
        from fastnas.spaces.darts_eval import NetworkCIFAR, NetworkImageNet

        network = NetworkImageNet if config.dataset == "imagenet" else NetworkCIFAR
        return network(config.init_channels, num_classes, config.layers, config.auxiliary, genotype, in_channels)
