"""The DARTS search network (supernet).

Follows DARTS (Liu et al., 2019), with the partial channels and edge
normalisation of PC-DARTS (Xu et al., 2020), the per-edge candidate subsets and
skip_connect dropout of P-DARTS (Chen et al., 2019) and the hard Gumbel
sampling of GDAS (Dong and Yang, 2019).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from fastnas.nn.cell import Cell, normalize_edge_weights, num_edges
from fastnas.nn.edge_plan import check_memory
from fastnas.nn.mixed_op import checkpoint_module
from fastnas.nn.operations import check_primitives
from fastnas.nn.supernet import SuperNet, entropy
from fastnas.spaces.darts.genotype import CELL_TYPES, DARTS_PRIMITIVES, DartsEncoding, Genotype, parse_cell

STEMS = ("cifar", "imagenet")


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
