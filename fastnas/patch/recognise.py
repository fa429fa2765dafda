"""Recognition: which modules of a model are mixed ops or cells, and what they hold.

Recognition is by structure, since forks rename classes, attributes and methods;
the candidates themselves are read by ``fastnas.nn.edge_plan`` (the one
recogniser). What a found module's methods compute is then checked on a float64
probe (``fastnas.patch.check``).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass

import torch.nn as nn

from fastnas.nn.edge_plan import EdgePlan, plan_edge
from fastnas.patch.report import DARTS, GDAS_SUM, NB201_CELL, NONZERO_SUM, ONE, PC_DARTS, SUM

# Candidate lists under these names are taken for mixed ops even when no candidate is recognised,
# so that an unknown candidate is named in a warning rather than passed over.
MIXED_OP_LISTS = ("_ops", "m_ops")
_EDGE_KEY = re.compile(r"^(\d+)<-(\d+)$")
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
# The channel proportions 1/K tried on a PC-DARTS mixed op that does not keep K on the
# module (K written into its forward): PC-DARTS' CIFAR and ImageNet searches, and 1/8.
PROPORTIONS = (4, 2, 8)


@dataclass(frozen=True)
class Edge:
    """One list of candidates as read at patch time: a mixed op's (``key`` None) or a cell's edge."""

    key: str | None
    plan: EdgePlan

    @property
    def n(self) -> int:
        return len(self.plan.kinds)


@dataclass(frozen=True)
class Plan:
    """Everything the patched methods need: plain data, so copies and pickles stay valid."""

    style: str
    attr: str  # the candidate list (mixed op) or the dict of edges (cell)
    edges: tuple[Edge, ...]
    backend: str | None
    memory: str
    methods: tuple[tuple[str, str], ...] = ()  # (method name, what its replacement computes)
    index_attr: str | None = None  # cell: the instance dict from edge key to row of the weights
    nodes: int = 0  # cell: the number of nodes
    groups: int = 0  # PC-DARTS: K, the candidates take the first C/K channels
    pool: str | None = None  # PC-DARTS: the bypass's 2x2 max pool (its attribute)

    @property
    def edge(self) -> EdgePlan:
        return self.edges[0].plan

    @property
    def n(self) -> int:
        return self.edges[0].n


class Reader:
    """Candidate lists read once per ``patch`` call (lists are looked at from their
    module and again from the list that holds that module)."""

    def __init__(self):
        self._plans: dict[int, tuple[nn.Module, EdgePlan]] = {}

    def plan(self, ops: nn.ModuleList) -> EdgePlan:
        got = self._plans.get(id(ops))
        if got is None or got[0] is not ops:
            got = (ops, plan_edge(ops))
            self._plans[id(ops)] = got
        return got[1]

    def holds_candidates(self, module: nn.Module) -> bool:
        """Whether ``module`` holds a list of candidates: a mixed op (or a DARTS cell, by name)."""
        for name, child in module._modules.items():
            if isinstance(child, nn.ModuleList) and len(child):
                if name in MIXED_OP_LISTS or any(kind is not None for kind in self.plan(child).kinds):
                    return True
        return False


@dataclass
class Found:
    style: str
    attr: str
    edges: tuple[Edge, ...]
    methods: dict[str, int]  # name -> number of arguments (2 or 3)
    index_attr: str | None = None
    nodes: int = 0
    groups: int | None = 0  # PC-DARTS: K as the module keeps it, or None: read by probing
    pool: str | None = None

    def readings(self) -> list[Found]:
        """What the module may compute, one reading each: itself, or, for a PC-DARTS
        mixed op that does not keep its channel proportion, one per proportion tried
        (``PROPORTIONS``); the float64 check at patch time settles which it is."""
        if self.groups is not None:
            return [self]
        return [dataclasses.replace(self, groups=k) for k in PROPORTIONS]


def _plain_arity(fn) -> int | None:
    """The number of arguments after self, when all are plain positional ones without defaults."""
    try:
        params = list(inspect.signature(fn).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind not in plain or p.default is not inspect.Parameter.empty for p in params):
        return None
    return len(params)


def signature(cls, name: str) -> str:
    try:
        sig = inspect.signature(getattr(cls, name))
    except (TypeError, ValueError, AttributeError):
        return "(...)"
    return str(sig.replace(parameters=list(sig.parameters.values())[1:]))


def _weighted_methods(cls) -> dict[str, int]:
    """The class's own methods that may compute a weighted sum: a name containing
    ``forward``, 2 or 3 plain arguments. Methods of torch's classes are never taken."""
    seen: dict[str, int | None] = {}
    for klass in cls.__mro__:
        if klass is object or klass.__module__.split(".")[0] == "torch":
            continue
        for name, fn in vars(klass).items():
            if name in seen or name.startswith("_") or "forward" not in name:
                continue
            seen[name] = _plain_arity(fn) if inspect.isfunction(fn) else None
    return {name: arity for name, arity in seen.items() if arity in (2, 3)}


def _forward_takes_more_than_x(cls) -> bool:
    """Whether the class's own ``forward`` takes more than one argument (weights, perhaps)."""
    if not any("forward" in vars(k) for k in cls.__mro__ if k.__module__.split(".")[0] != "torch"):
        return False
    try:
        return len(inspect.signature(cls.forward).parameters) > 2
    except (TypeError, ValueError):
        return False


def find(module: nn.Module, reader: Reader) -> Found | str | None:
    """What ``module`` is (a mixed op or a cell), why it cannot be patched, or None."""
    if isinstance(module, _CONTAINERS) or type(module).__module__.split(".")[0] == "fastnas":
        return None  # containers have no sum of their own; fastnas's modules are fused already
    methods = _weighted_methods(type(module))
    cell = _find_cell(module, reader, methods)
    if cell is not None:
        return cell
    return _find_mixed_op(module, reader, methods)


def _find_mixed_op(module: nn.Module, reader: Reader, methods: dict[str, int]) -> Found | str | None:
    lists = []
    for name, child in module._modules.items():
        if not isinstance(child, nn.ModuleList) or not len(child):
            continue
        if any(reader.holds_candidates(entry) for entry in child):
            continue  # a list of mixed ops: a cell's, each handled on its own
        edge = reader.plan(child)
        if name in MIXED_OP_LISTS or any(kind is not None for kind in edge.kinds):
            lists.append((name, child, edge))
    if not lists:
        return None
    attr, ops, edge = lists[0]
    recognised = all(kind is not None for kind in edge.kinds)
    if not methods:
        looks_mixed = attr in MIXED_OP_LISTS or (
            recognised and len(ops) > 1 and _forward_takes_more_than_x(type(module))
        )
        if not any(kind is not None for kind in edge.kinds) or not looks_mixed:
            return None  # some other module that happens to own such a list
        return f"its forward{signature(type(module), 'forward')} does not take exactly (x, weights)"
    if len(lists) > 1:
        return f"it holds more than one list of candidates ({', '.join(name for name, _, _ in lists)})"
    for k, (op, kind) in enumerate(zip(ops, edge.kinds)):
        if kind is None:
            return f"candidate {attr}[{k}] ({type(op).__name__}) is not a recognised DARTS candidate"
    style, groups, pool = DARTS, 0, None
    extra = [name for name in module._modules if name != attr]
    pools = [name for name in extra if _is_bypass_pool(module._modules[name])]
    if "mp" in extra and "mp" not in pools:
        return f"its mp ({module._modules['mp']}) is not the 2x2 max pool of PC-DARTS"
    if len(pools) == 1:
        # PC-DARTS: K kept on the module as an int k, or else written into its forward.
        style, pool = PC_DARTS, pools[0]
        k = getattr(module, "k", None)
        groups = k if isinstance(k, int) and not isinstance(k, bool) and k > 0 else None
        extra.remove(pool)
    if extra:
        return (
            f"it has submodules besides {attr} ({', '.join(extra)}), so its forward may do more than the weighted sum"
        )
    if not edge.active:
        return "every candidate is zero; there is nothing to sum"
    return Found(style, attr, (Edge(None, edge),), methods, groups=groups, pool=pool)


def _is_bypass_pool(m: nn.Module) -> bool:
    """Whether ``m`` is PC-DARTS' 2x2 max pool of the bypass channels."""
    return (
        isinstance(m, nn.MaxPool2d)
        and _pair(m.kernel_size) == (2, 2)
        and _pair(m.stride) == (2, 2)
        and _pair(m.padding) == (0, 0)
        and _pair(m.dilation) == (1, 1)
        and not m.ceil_mode
    )


def _find_cell(module: nn.Module, reader: Reader, methods: dict[str, int]) -> Found | str | None:
    for attr, child in module._modules.items():
        if not isinstance(child, nn.ModuleDict) or not len(child):
            continue
        keys = list(child.keys())
        if not all(_EDGE_KEY.match(k) for k in keys) or not all(isinstance(v, nn.ModuleList) for v in child.values()):
            continue
        if any(reader.holds_candidates(entry) for ops in child.values() for entry in ops):
            continue
        plans = {k: reader.plan(child[k]) for k in keys}
        if not any(kind is not None for p in plans.values() for kind in p.kinds):
            continue
        if not methods:
            return None
        return _cell_found(module, attr, plans, methods)
    return None


def _edge_order(key: str) -> tuple[int, int]:
    i, j = _EDGE_KEY.match(key).groups()
    return int(i), int(j)


def _cell_found(module: nn.Module, attr: str, plans: dict[str, EdgePlan], methods) -> Found | str:
    keys = sorted(plans, key=_edge_order)
    nodes = 1 + max(i for i, _ in map(_edge_order, keys))
    if set(keys) != {f"{i}<-{j}" for i in range(1, nodes) for j in range(i)}:
        return f"its edges {attr} are not every edge i<-j (j < i < {nodes}) that its sum runs over"
    edges = module._modules[attr]
    for key in keys:
        for c, kind in enumerate(plans[key].kinds):
            if kind is None:
                op = edges[key][c]
                return f"candidate {attr}['{key}'][{c}] ({type(op).__name__}) is not a recognised DARTS candidate"
    if len({len(plans[k].kinds) for k in keys}) > 1:
        return f"the edges of {attr} differ in their number of candidates"
    extra = [name for name in module._modules if name != attr]
    if extra:
        return f"it has submodules besides {attr} ({', '.join(extra)}), so its forward may do more than the sum"
    index_attr = _edge_index(module, keys)
    if index_attr is None:
        return f"no dict of the instance maps the keys of {attr} to rows of the weights (as edge2index does)"
    return Found(NB201_CELL, attr, tuple(Edge(k, plans[k]) for k in keys), methods, index_attr, nodes)


def _edge_index(module: nn.Module, keys: list[str]) -> str | None:
    """The name of the instance dict that maps exactly these edge keys to the rows 0..E-1."""
    want = set(keys)
    names = ["edge2index"] + [n for n in vars(module) if n != "edge2index"]
    for name in names:
        d = module.__dict__.get(name)
        if (
            isinstance(d, dict)
            and set(d) == want
            and all(isinstance(v, int) and not isinstance(v, bool) for v in d.values())
            and sorted(d.values()) == list(range(len(want)))
        ):
            return name
    return None


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def replacements_for(found: Found, arity: int) -> tuple[str, ...]:
    """What a method of ``arity`` arguments may compute, in the order tried."""
    if arity == 2:
        return (SUM,) if found.style == NB201_CELL else (SUM, NONZERO_SUM)
    if found.style == NB201_CELL:
        return (GDAS_SUM,)
    if found.style == DARTS:
        return (GDAS_SUM, ONE)
    return ()
