"""Speed up existing DARTS-family search code in place: ``patch``, ``unpatch``, ``accelerate``.

::

    model = Network(C, num_classes, layers, criterion)   # the user's own code
    fastnas.patch(model)                                  # the one added line

``patch`` finds the modules of a model that sum candidate operations with
architecture weights and replaces, on each instance only, the methods that compute
those sums with ones that run through the fused ops: the fused edge
(``fastnas.ops.darts_edge``) where it computes every candidate of an edge, else the
fused weighted sum (``fastnas.ops.mixed_sum``, ``partial_channel_mixed_sum`` for
PC-DARTS) over the outputs of the candidate modules. The candidates still run
through their own modules, parameters and buffers: nothing is copied, registered or
renamed, so ``state_dict`` keys and values, checkpoints, optimisers and hooks are
untouched. ``nn.DataParallel`` replicas, deep copies and pickles of a patched model
run their own modules. ``unpatch`` deletes the instance attributes again, leaving
each module's ``__dict__`` as it was.

Recognition is by structure, since forks rename classes, attributes and methods;
the candidates themselves are read by ``fastnas.nn.edge_plan`` (the one recogniser).

* A **mixed op** holds one ``nn.ModuleList`` of candidates, under any name (``_ops``,
  ``m_ops``, ``ops``, ``layers``, ``candidate_ops``, ...), and nothing else but, in the
  PC-DARTS style, a child ``mp`` that is ``nn.MaxPool2d(2, 2)`` with an int attribute
  ``k`` (the channel proportion). Every candidate must be one ``edge_plan`` knows:
  zero, identity, pools (alone, wrapped as AutoDL's ``POOLING``, or followed by a
  batch norm), identity + dropout (P-DARTS), factorized reduces, ReLU/Conv2d/
  BatchNorm2d chains; batch norms affine or not, tracking running statistics or not.
* A **cell** in the NAS-Bench-201 style holds an ``nn.ModuleDict`` whose keys
  ``"i<-j"`` name every edge of the complete graph over its nodes, each value an
  ``nn.ModuleList`` of candidates, and a dict of the instance (``edge2index``) from
  key to row of the weights; its methods sum every edge's candidates inline.
  Lists of mixed ops (DARTS cells) are containers and are passed over silently.

The methods replaced are those of the module's class whose name contains ``forward``
and that take plain positional arguments: ``(x, weights)`` (``forward``,
``forward_darts``, ...; for a cell ``(inputs, weightss)``), replaced by:

* ``sum``: ``sum_k weights[k] * op_k(x)`` (mixed op), PC-DARTS'
  ``shuffle(cat(sum_k weights[k] * op_k(x[:, :C/k]), bypass), k)`` with the bypass
  max-pooled 2x2 when the candidates reduce, or, for a cell, node ``i`` = the sum
  over ``j < i`` of edge ``"i<-j"``'s weighted sum of node ``j``, with the weights
  ``weightss[edge2index["i<-j"]]``, returning the last node;

and ``(x, weights, index)`` (GDAS hard samples: ``forward_gdas``), replaced by:

* ``gdas-sum``: ``weights[a] * op_a(x) + sum_{k != a} weights[k]`` with ``a`` the
  sampled index (``index[edge2index[key]].item()`` in a cell): AutoDL's sum, in
  which the other candidates are not run but their hard weights (zero in value)
  still receive the output gradient's sum. Computed as one ``addcmul``.

A method is replaced only when it computes what its replacement does. Besides the
structure, each distinct (class, method, candidate kinds, stride) is checked once
per ``patch`` call: the original method and the replacement run on two float64
copies of the module, in training and in eval mode, with the same seeded probe
input, weights (and index) and random state; their outputs, the gradients of the
input, of the weights and of every parameter, and the batch-norm buffers must agree
to rounding. The model itself, its batch-norm statistics and the random state are
left untouched. A GDAS method that runs only the sampled candidate
(``op_a(x) * weights[a]``) has nothing to fuse and is kept as it is (the report says
so, without a warning). A module whose methods all fail (or whose ``forward`` does)
is named in a ``PatchWarning``; the report lists every method left unchanged, with
the reason.

The patched methods call the non-zero candidates in their original order, so the
random numbers drawn (P-DARTS dropout) and the batch-norm statistics updated are
those of the original. Zero candidates are not run: their term is exactly 0, and
their weights still receive their exact (zero) gradient through the indexing of
``weights``. The one result that can differ is on inputs holding inf or NaN, where
the original's ``0 * x`` term would be NaN. Calls the fused ops cannot take (weights
that are not a tensor of one entry per candidate, an index that is not one int per
edge, keyword arguments, candidates whose outputs disagree in shape, dtype or
device, a list edited since patching) are computed the original way.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from fastnas import backends
from fastnas.nn.edge_plan import FUSED_MEMORY_MODES, EdgePlan, check_memory, plan_edge
from fastnas.nn.mixed_op import checkpoint_module
from fastnas.ops import channel_shuffle, mixed_sum, partial_channel_mixed_sum
from fastnas.ops.darts_edge import darts_edge

__all__ = ["PatchReport", "PatchWarning", "PatchedOp", "SkippedOp", "accelerate", "patch", "unpatch"]

# Candidate lists under these names are taken for mixed ops even when no candidate is recognised,
# so that an unknown candidate is named in a warning rather than passed over.
MIXED_OP_LISTS = ("_ops", "m_ops")
DARTS = "darts"
PC_DARTS = "pc-darts"
NB201_CELL = "nb201-cell"
# What a replaced method computes (see the module docstring).
SUM = "sum"
GDAS_SUM = "gdas-sum"
_ONE = "one"  # a GDAS hard sample that runs one candidate: recognised, never replaced
_DESCRIBE = {
    SUM: "the weighted sum of its candidates",
    GDAS_SUM: "the GDAS hard-sample sum (the sampled candidate times its weight, plus the other weights)",
    _ONE: "one sampled candidate times its weight",
}
_STATE = "_fastnas_patch"
_BOUND = "_fastnas_bound"
_EDGE_KEY = re.compile(r"^(\d+)<-(\d+)$")
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
_PROBE_SIZE = 8
_PROBE_TOL = dict(rtol=1e-6, atol=1e-9)


class PatchWarning(UserWarning):
    """A mixed op or cell that ``fastnas.patch`` left unchanged."""


@dataclass(frozen=True)
class PatchedOp:
    """A patched module: its candidates (a cell's first edge), which methods now compute
    what (``sum`` or ``gdas-sum``), and how the weighted sum runs (``fused edge`` in
    training, or ``fused sum`` with the reason the fused edge does not take it)."""

    path: str
    style: str
    candidates: tuple[str, ...]
    skipped_zero: tuple[int, ...]
    methods: tuple[tuple[str, str], ...] = (("forward", SUM),)
    how: str = "fused edge"
    edges: int = 1


@dataclass(frozen=True)
class SkippedOp:
    """A module (``method`` None) or one of its methods left unchanged, and why."""

    path: str
    reason: str
    method: str | None = None


@dataclass
class PatchReport:
    """What one ``patch`` call changed (``patched``), found already patched, and left alone.

    ``skipped``: modules left wholly unchanged (each also named in a ``PatchWarning``);
    ``methods_left``: methods of modules that look like a weighted sum by their
    signature but were not replaced, e.g. a GDAS method that runs one candidate.
    """

    backend: str | None
    patched: list[PatchedOp] = field(default_factory=list)
    already_patched: list[str] = field(default_factory=list)
    skipped: list[SkippedOp] = field(default_factory=list)
    methods_left: list[SkippedOp] = field(default_factory=list)

    def __str__(self) -> str:
        cells = sum(op.style == NB201_CELL for op in self.patched)
        what = f"{len(self.patched) - cells} mixed ops" + (f" and {cells} cells" if cells else "")
        lines = [
            f"fastnas.patch (backend: {self.backend or 'auto'}): {what} patched, "
            f"{len(self.already_patched)} already patched, {len(self.skipped)} left unchanged"
        ]
        groups = Counter(
            (op.style, op.methods, op.how, op.edges, op.candidates, len(op.skipped_zero)) for op in self.patched
        )
        for (style, methods, how, edges, cands, zeros), count in sorted(groups.items()):
            names = ", ".join(f"{name} ({what})" for name, what in methods)
            per = f" of {edges} edges" if style == NB201_CELL else ""
            note = f"; {zeros} zero candidate(s) not run" if zeros else ""
            lines.append(f"  patched {count:4d} x {style}{per} {names}: [{', '.join(cands)}] via {how}{note}")
        for op in self.skipped:
            lines.append(f"  unchanged {op.path}: {op.reason}")
        for (method, reason), count in Counter((op.method, op.reason) for op in self.methods_left).items():
            lines.append(f"  not replaced {count:4d} x {method}: {reason}")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Edge:
    """One list of candidates as read at patch time: a mixed op's (``key`` None) or a cell's edge."""

    key: str | None
    plan: EdgePlan

    @property
    def n(self) -> int:
        return len(self.plan.kinds)

    @property
    def active_index(self):
        a = self.plan.active
        # A slice is a view and its backward a narrow copy, cheaper than gathering.
        if a == tuple(range(a[0], a[-1] + 1)):
            return slice(a[0], a[-1] + 1)
        return list(a)


@dataclass(frozen=True)
class _Plan:
    """Everything the patched methods need: plain data, so copies and pickles stay valid."""

    style: str
    attr: str  # the candidate list (mixed op) or the dict of edges (cell)
    edges: tuple[_Edge, ...]
    backend: str | None
    memory: str
    methods: tuple[tuple[str, str], ...] = ()  # (method name, what its replacement computes)
    index_attr: str | None = None  # cell: the instance dict from edge key to row of the weights
    nodes: int = 0  # cell: the number of nodes

    @property
    def edge(self) -> EdgePlan:
        return self.edges[0].plan

    @property
    def n(self) -> int:
        return self.edges[0].n


class _PatchedMethod:
    """A replaced method on the instance (``forward``, ``forward_darts``, ...).

    A callable object rather than a closure, so ``copy.deepcopy`` and pickling of a
    patched model rebind it to the copied module instead of the original one.
    """

    __slots__ = ("module", "name")

    def __init__(self, module: nn.Module, name: str):
        self.module = module
        self.name = name

    def __call__(self, *args, **kwargs):
        return _call(self.module, self.name, args, kwargs)

    def __repr__(self) -> str:
        return f"<fastnas patched {self.name} of {type(self.module).__name__}>"


class _Replicate:
    """The instance ``_replicate_for_data_parallel`` of a patched module.

    ``nn.DataParallel`` builds each replica from a shallow copy of the module's
    ``__dict__``, which would leave the replica's methods running the original
    module; this rebinds the copy to the replica.
    """

    __slots__ = ("module",)

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self):
        replica = type(self.module)._replicate_for_data_parallel(self.module)
        replica.__dict__.pop(_BOUND, None)  # the original's bound tensors; the replica binds its own
        _bind(replica)
        return replica


def _bind(module: nn.Module) -> None:
    for name, _ in module.__dict__[_STATE].methods:
        object.__setattr__(module, name, _PatchedMethod(module, name))
    object.__setattr__(module, "_replicate_for_data_parallel", _Replicate(module))


# --- recognition -------------------------------------------------------------------


class _Reader:
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
class _Found:
    style: str
    attr: str
    edges: tuple[_Edge, ...]
    methods: dict[str, int]  # name -> number of arguments (2 or 3)
    index_attr: str | None = None
    nodes: int = 0


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


def _signature(cls, name: str) -> str:
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


def _find(module: nn.Module, reader: _Reader) -> _Found | str | None:
    """What ``module`` is (a mixed op or a cell), why it cannot be patched, or None."""
    if isinstance(module, _CONTAINERS) or type(module).__module__.split(".")[0] == "fastnas":
        return None  # containers have no sum of their own; fastnas's modules are fused already
    methods = _weighted_methods(type(module))
    cell = _find_cell(module, reader, methods)
    if cell is not None:
        return cell
    return _find_mixed_op(module, reader, methods)


def _find_mixed_op(module: nn.Module, reader: _Reader, methods: dict[str, int]) -> _Found | str | None:
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
        return f"its forward{_signature(type(module), 'forward')} does not take exactly (x, weights)"
    if len(lists) > 1:
        return f"it holds more than one list of candidates ({', '.join(name for name, _, _ in lists)})"
    for k, (op, kind) in enumerate(zip(ops, edge.kinds)):
        if kind is None:
            return f"candidate {attr}[{k}] ({type(op).__name__}) is not a recognised DARTS candidate"
    style = DARTS
    extra = [name for name in module._modules if name != attr]
    if "mp" in extra:
        mp = module._modules["mp"]
        if not (
            isinstance(mp, nn.MaxPool2d)
            and _pair(mp.kernel_size) == (2, 2)
            and _pair(mp.stride) == (2, 2)
            and _pair(mp.padding) == (0, 0)
            and _pair(mp.dilation) == (1, 1)
            and not mp.ceil_mode
        ):
            return f"its mp ({mp}) is not the 2x2 max pool of PC-DARTS"
        k = getattr(module, "k", None)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            return f"it has a PC-DARTS bypass pool mp but no positive int channel proportion k (k={k!r})"
        style = PC_DARTS
        extra.remove("mp")
    if extra:
        return (
            f"it has submodules besides {attr} ({', '.join(extra)}), so its forward may do more than the weighted sum"
        )
    if not edge.active:
        return "every candidate is zero; there is nothing to sum"
    return _Found(style, attr, (_Edge(None, edge),), methods)


def _find_cell(module: nn.Module, reader: _Reader, methods: dict[str, int]) -> _Found | str | None:
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


def _cell_found(module: nn.Module, attr: str, plans: dict[str, EdgePlan], methods) -> _Found | str:
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
    return _Found(NB201_CELL, attr, tuple(_Edge(k, plans[k]) for k in keys), methods, index_attr, nodes)


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


# --- the replaced methods ----------------------------------------------------------


def _call(module: nn.Module, name: str, args: tuple, kwargs: dict):
    plan: _Plan = module.__dict__[_STATE]
    what = dict(plan.methods).get(name)
    out = None if what is None or kwargs else _replacement(module, plan, what, args)
    if out is None:
        return getattr(type(module), name)(module, *args, **kwargs)
    return out


def _replacement(module: nn.Module, plan: _Plan, what: str, args: tuple):
    """What the replaced method computes, or None for a call the fused ops cannot take
    (decided before any candidate runs, so that the original then runs them once)."""
    if len(args) != (3 if what in (GDAS_SUM, _ONE) else 2):
        return None
    if plan.style == NB201_CELL:
        return _cell(module, plan, what, *args)
    if what == GDAS_SUM:
        return _mixed_gdas(module, plan, *args)
    if what == _ONE:
        return _mixed_one(module, plan, *args)
    return _mixed(module, plan, *args)


def _summable(outs: list[torch.Tensor]) -> bool:
    o0 = outs[0]
    return (
        all(
            isinstance(o, torch.Tensor) and o.shape == o0.shape and o.dtype == o0.dtype and o.device == o0.device
            for o in outs
        )
        and o0.dtype.is_floating_point
    )


def _original_sum(ops, e: _Edge, outs: list[torch.Tensor], x, weights):
    """The original ``sum(w * op(x))`` from outputs already computed (zero ones run now)."""
    done = dict(zip(e.plan.active, outs))
    return sum(w * (done[k] if k in done else ops[k](x)) for k, w in zip(range(e.n), weights))


def _takes_weights(weights, n: int) -> bool:
    return isinstance(weights, torch.Tensor) and weights.dim() == 1 and weights.shape[0] == n


def _mixed(module: nn.Module, plan: _Plan, x, weights):
    e = plan.edges[0]
    ops = module._modules[plan.attr]
    if len(ops) != e.n or not isinstance(x, torch.Tensor) or not _takes_weights(weights, e.n):
        return None
    if plan.memory == "checkpoint" and torch.is_grad_enabled():
        return checkpoint_module(module, lambda x, weights: _mixed_sum(module, ops, plan, x, weights), x, weights)
    return _mixed_sum(module, ops, plan, x, weights)


def _mixed_sum(module: nn.Module, ops, plan: _Plan, x: torch.Tensor, weights: torch.Tensor):
    if plan.style == PC_DARTS:
        return _pc_forward(module, ops, plan, x, weights)
    return _weighted_sum(module, plan, plan.edges[0], ops, x, weights)


def _terms(module: nn.Module, plan: _Plan, e: _Edge, ops, x: torch.Tensor, weights: torch.Tensor):
    """The edge's weighted sum as (terms, their weights, whether the terms are the
    non-zero candidates' outputs): the whole fused edge, the fused part and the other
    candidates' outputs, or every non-zero candidate's output. Candidates that run as
    modules run in their original order."""
    fused = _fused_edge(module, plan, e, e.plan, ops, ops, x, weights)
    if fused is not None:
        return [fused], weights.new_ones(1), False
    part = e.plan.part
    if part is not None:
        index = e.plan.part_index
        y = _fused_edge(module, plan, e, part, ops, [ops[i] for i in index], x, weights[list(index)])
        if y is not None:
            rest = e.plan.rest
            outs = [ops[k](x) for k in rest]
            return [y, *outs], torch.cat([weights.new_ones(1), weights[list(rest)]]), False
    return [ops[k](x) for k in e.plan.active], weights[e.active_index], True


def _weighted_sum(module: nn.Module, plan: _Plan, e: _Edge, ops, x: torch.Tensor, weights: torch.Tensor):
    """``sum_k weights[k] * op_k(x)`` of one edge: the fused edge (or its fused part),
    the fused sum over the candidates' outputs, else the original sum."""
    terms, w, outputs = _terms(module, plan, e, ops, x, weights)
    if not outputs and len(terms) == 1:
        return terms[0]
    if _summable(terms):
        return mixed_sum(terms, w, backend=plan.backend)
    if outputs:
        return _original_sum(ops, e, terms, x, weights)
    return sum(wk * t for wk, t in zip(w, terms))


def _pc_forward(module: nn.Module, ops, plan: _Plan, x: torch.Tensor, weights: torch.Tensor):
    e = plan.edges[0]
    k = module.k
    c = x.shape[1]
    part, bypass = x[:, : c // k], x[:, c // k :]
    outs, coef, outputs = _terms(module, plan, e, ops, part, weights)
    o0 = outs[0]
    # The original decides on pooling by comparing heights only; so does this.
    pool = o0.dim() == 4 and o0.shape[2] != x.shape[2]
    h, w = bypass.shape[2:]
    fits = (
        _summable(outs)
        and o0.dim() == 4
        and bypass.shape[1] > 0
        and bypass.dtype == o0.dtype
        and (o0.shape[1] + bypass.shape[1]) % k == 0
        and (
            (h % 2 == 0 and w % 2 == 0 and (h // 2, w // 2) == tuple(o0.shape[2:]))
            if pool
            else (h, w) == tuple(o0.shape[2:])
        )
    )
    if fits:
        return partial_channel_mixed_sum(outs, coef, bypass, k, pool, backend=plan.backend)
    if outputs:
        mixed = _original_sum(ops, e, outs, part, weights)
    else:
        mixed = sum(c * t for c, t in zip(coef, outs))
    if mixed.shape[2] == x.shape[2]:
        return channel_shuffle(torch.cat([mixed, bypass], dim=1), k)
    return channel_shuffle(torch.cat([mixed, module.mp(bypass)], dim=1), k)


def _fused_edge(module: nn.Module, plan: _Plan, e: _Edge, edge: EdgePlan, ops, candidates, x, weights):
    """``candidates`` (the edge's list ``ops``, or its fused part) through
    ``fastnas.ops.darts_edge``, or None where ``edge`` says they cannot run fused
    (``fastnas.nn.edge_plan.EdgePlan.fused_reason``)."""
    if edge.fused_reason(x, plan.backend, training=ops.training, memory=plan.memory) is not None:
        return None
    cache = module.__dict__.get(_BOUND)
    if not isinstance(cache, dict):
        cache = {}
        object.__setattr__(module, _BOUND, cache)
    key = (e.key, edge is e.plan)
    bound = cache.get(key)
    if bound is None or any(a is not b for a, b in zip(bound.candidates, candidates)):
        bound = cache[key] = edge.bind(candidates)
    return darts_edge(
        x, weights, bound.parameters(), edge.spec, bound.buffers(), memory=plan.memory, backend=plan.backend
    )


def _pick(index, n: int) -> int | None:
    """A sampled index given as an int or a one-element integer tensor, if in range."""
    if isinstance(index, torch.Tensor) and index.numel() == 1 and not index.is_floating_point():
        index = int(index.item())
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
        return None
    return index


def _gdas_sum(ops, e: _Edge, x: torch.Tensor, weights: torch.Tensor, a: int):
    """``weights[a] * op_a(x) + sum_{k != a} weights[k]`` in one pass over the output."""
    y = ops[a](x)
    rest = [k for k in range(e.n) if k != a]
    if not rest or not isinstance(y, torch.Tensor) or not y.dtype.is_floating_point:
        return sum(weights[k] * y if k == a else weights[k] for k in range(e.n))
    return torch.addcmul(weights[rest].sum().to(y.dtype), y, weights[a].to(y.dtype))


def _mixed_gdas(module: nn.Module, plan: _Plan, x, weights, index):
    e = plan.edges[0]
    ops = module._modules[plan.attr]
    a = _pick(index, e.n)
    if len(ops) != e.n or a is None or not isinstance(x, torch.Tensor) or not _takes_weights(weights, e.n):
        return None
    return _gdas_sum(ops, e, x, weights, a)


def _mixed_one(module: nn.Module, plan: _Plan, x, weights, index):
    """What a GDAS method that runs one candidate computes; used only to recognise one."""
    ops = module._modules[plan.attr]
    return ops[index](x) * weights[index]


def _cell(module: nn.Module, plan: _Plan, what: str, inputs, weightss, index=None):
    edges = module._modules.get(plan.attr)
    rows = getattr(module, plan.index_attr, None)
    if (
        not isinstance(edges, nn.ModuleDict)
        or not isinstance(rows, dict)
        or not isinstance(inputs, torch.Tensor)
        or not isinstance(weightss, torch.Tensor)
        or weightss.dim() != 2
    ):
        return None
    live = {}
    for e in plan.edges:
        ops = edges._modules.get(e.key)
        row = rows.get(e.key)
        if (
            not isinstance(ops, nn.ModuleList)
            or len(ops) != e.n
            or isinstance(row, bool)
            or not isinstance(row, int)
            or not 0 <= row < weightss.shape[0]
            or weightss.shape[1] != e.n
        ):
            return None
        live[e.key] = (e, ops, row)
    picks = None
    if what == GDAS_SUM:
        if not isinstance(index, torch.Tensor) or index.is_floating_point() or index.dim() < 1:
            return None
        if index.shape[0] != weightss.shape[0] or index[0].numel() != 1:
            return None
        picks = index.reshape(index.shape[0]).tolist()  # one host sync for every edge
        if not all(0 <= picks[row] < e.n for e, _, row in live.values()):
            return None
    nodes = [inputs]
    for i in range(1, plan.nodes):
        total = None
        for j in range(i):
            e, ops, row = live[f"{i}<-{j}"]
            if picks is not None:
                out = _gdas_sum(ops, e, nodes[j], weightss[row], picks[row])
            elif plan.memory == "checkpoint" and torch.is_grad_enabled():
                fn = _CellEdge(module, plan, e, ops)
                out = checkpoint_module(ops, fn, nodes[j], weightss[row])
            else:
                out = _weighted_sum(module, plan, e, ops, nodes[j], weightss[row])
            total = out if total is None else total + out
        nodes.append(total)
    return nodes[-1]


class _CellEdge:
    __slots__ = ("module", "plan", "edge", "ops")

    def __init__(self, module, plan, edge, ops):
        self.module, self.plan, self.edge, self.ops = module, plan, edge, ops

    def __call__(self, x, weights):
        return _weighted_sum(self.module, self.plan, self.edge, self.ops, x, weights)


# --- the check at patch time -------------------------------------------------------


@contextlib.contextmanager
def _random_state_kept():
    state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(state)


def _twin(module: nn.Module) -> nn.Module:
    twin = copy.deepcopy(module)
    for name in list(twin.__dict__):
        if isinstance(twin.__dict__[name], (_PatchedMethod, _Replicate)) or name in (_STATE, _BOUND):
            del twin.__dict__[name]
    return twin.to(device="cpu", dtype=torch.float64)


def _probe_args(module: nn.Module, plan: _Plan, what: str, gen: torch.Generator):
    n = plan.n
    if plan.style == NB201_CELL:
        C = plan.edges[0].plan.channels
        weights_shape = (len(plan.edges), n)
    else:
        C = plan.edge.channels
        if C is not None and plan.style == PC_DARTS:
            C *= module.k
        weights_shape = (n,)
    if C is None:
        raise ValueError("the channels cannot be read off the candidates")
    x = torch.randn(2, C, _PROBE_SIZE, _PROBE_SIZE, generator=gen, dtype=torch.float64).requires_grad_(True)
    weights = torch.randn(weights_shape, generator=gen, dtype=torch.float64).softmax(-1).requires_grad_(True)
    args = [x, weights]
    if what in (GDAS_SUM, _ONE):
        if plan.style == NB201_CELL:
            args.append(torch.randint(0, n, (len(plan.edges), 1), generator=gen))
        else:
            args.append(int(torch.randint(0, n, (1,), generator=gen)))
    return args, [x, weights]


def _probe_run(twin: nn.Module, fn, plan: _Plan, what: str) -> dict:
    """Outputs, gradients and buffers of ``fn(twin, *probe)`` in training then eval mode."""
    gen = torch.Generator().manual_seed(0)
    grad_gen = torch.Generator().manual_seed(1)
    params = [(n, p) for n, p in twin.named_parameters() if p.requires_grad]
    seen = {}
    with _random_state_kept():
        for training in (True, False):
            twin.train(training)
            args, leaves = _probe_args(twin, plan, what, gen)
            torch.manual_seed(2)
            out = fn(twin, *args)
            if not isinstance(out, torch.Tensor) or not out.dtype.is_floating_point:
                raise TypeError(f"returned {type(out).__name__}, not a floating-point tensor")
            g = torch.randn(out.shape, generator=grad_gen, dtype=out.dtype)
            grads = torch.autograd.grad(out, leaves + [p for _, p in params], g, allow_unused=True)
            mode = "training" if training else "eval"
            seen[f"output ({mode})"] = out.detach()
            seen[f"input gradient ({mode})"] = grads[0]
            seen[f"weights gradient ({mode})"] = grads[1]
            for (name, _), gp in zip(params, grads[2:]):
                seen[f"gradient of {name} ({mode})"] = gp
    for name, b in twin.named_buffers():
        seen[f"buffer {name}"] = b.detach().clone()
    return seen


def _difference(a: dict, b: dict) -> str | None:
    for name, u in a.items():
        v = b.get(name)
        if (u is None) != (v is None):
            return f"{name} is {'missing' if v is None else 'present where the original has none'}"
        if u is None:
            continue
        if u.shape != v.shape:
            return f"{name} has shape {tuple(v.shape)}, the original's {tuple(u.shape)}"
        if u.is_floating_point() and not torch.allclose(v, u, **_PROBE_TOL, equal_nan=True):
            return f"{name} differs by {(v - u).abs().nan_to_num(float('inf')).max().item():.3g}"
        if not u.is_floating_point() and not torch.equal(u, v):
            return f"{name} differs"
    return None


def _check(module: nn.Module, plan: _Plan, name: str, what: str) -> str | None:
    """None when method ``name`` computes what the replacement ``what`` computes on a
    float64 probe (outputs, gradients, buffers), else why it was not replaced."""
    # Whatever the caller's context (no_grad, inference mode, autocast), the probe needs gradients.
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        return _check_on_copies(module, plan, name, what)


def _check_on_copies(module: nn.Module, plan: _Plan, name: str, what: str) -> str | None:
    sig = _signature(type(module), name)
    try:
        twins = (_twin(module), _twin(module))
    except Exception as err:
        return f"{name}{sig} was not replaced: no float64 copy of the module to check it on ({type(err).__name__})"
    probe = dataclasses.replace(plan, backend=None, methods=((name, what),))
    original = getattr(type(module), name)

    def replaced(m, *args):
        out = _replacement(m, probe, what, args)
        if out is None:
            raise RuntimeError("the replacement did not take the probe call")
        return out

    runs = []
    for twin, fn, who in ((twins[0], original, "it"), (twins[1], replaced, "its replacement")):
        try:
            runs.append(_probe_run(twin, fn, probe, what))
        except Exception as err:
            return f"{name}{sig}: on a probe call {who} raised {type(err).__name__}: {str(err)[:120]}"
    diff = _difference(*runs)
    if diff is not None:
        return f"{name}{sig} does not compute {_DESCRIBE[what]}: on a float64 probe its {diff}"
    return None


def _check_key(module: nn.Module, found: _Found, name: str, what: str):
    edges = tuple((e.key, e.plan.kinds, e.plan.stride, e.plan.spec is not None) for e in found.edges)
    return (type(module), name, what, found.style, edges)


def _candidates_for(found: _Found, arity: int) -> tuple[str, ...]:
    if arity == 2:
        return (SUM,)
    if found.style == NB201_CELL:
        return (GDAS_SUM,)
    if found.style == DARTS:
        return (GDAS_SUM, _ONE)
    return ()


# --- public API --------------------------------------------------------------------


def _path(name: str) -> str:
    return name or "<root>"


def _how(plan: _Plan) -> str:
    """How the weighted sums run in training: the fused edge, or the fused sum and why."""
    if plan.backend == "reference":
        return "eager sum (backend='reference')"
    if plan.memory not in FUSED_MEMORY_MODES:
        return f"fused sum (memory={plan.memory!r})"
    ways = []
    for e in plan.edges:
        if e.plan.spec is not None:
            ways.append("fused edge")
        elif e.plan.part is not None:
            ways.append(
                f"fused edge on {len(e.plan.part_index)} of {e.n} candidates, fused sum with the others "
                f"({e.plan.reason})"
            )
        else:
            ways.append(f"fused sum ({e.plan.reason})")
    if len(set(ways)) == 1:
        return ways[0]
    return "; ".join(f"{count} edges {way}" for way, count in Counter(ways).items())


def patch(model: nn.Module, backend: str | None = None, memory: str = "save") -> PatchReport:
    """Route the mixed ops and cells of ``model`` through the fused ops, in place; return a report.

    ``backend``: the fastnas backend of the fused ops (None: chosen per call, as for
    ``fastnas.ops``; ``use_backend`` and FASTNAS_BACKEND apply). ``memory``: in
    training mode, edges whose candidates are all ones the fused edge computes
    (``fastnas.ops.darts_edge``) keep only their pre-BN tensors ("save") or nothing
    ("recompute", recomputed inside the fused backward); "sum" fuses only the
    weighted sum; "checkpoint" runs each patched mixed op (a cell: each edge) under
    ``torch.utils.checkpoint``. Patching a patched model again changes nothing but
    these two settings.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be an nn.Module, got {type(model).__name__}")
    check_memory(memory, "patch: memory")
    if backend is not None:
        backends.requested_backend(backend)  # an unknown name fails here, not mid-step
    report = PatchReport(backend=backend)
    reader = _Reader()
    checked: dict = {}
    for name, module in model.named_modules():
        path = _path(name)
        if _STATE in module.__dict__:
            old = module.__dict__[_STATE]
            object.__setattr__(module, _STATE, dataclasses.replace(old, backend=backend, memory=memory))
            report.already_patched.append(path)
            continue
        found = _find(module, reader)
        if found is None:
            continue
        if isinstance(found, str):
            _skip(report, module, path, found)
            continue
        plan = _Plan(found.style, found.attr, found.edges, backend, memory, (), found.index_attr, found.nodes)
        replaced, failed = [], []
        for meth, arity in found.methods.items():
            if meth in module.__dict__:
                failed.append((meth, f"its instance already has a {meth} of its own"))
                continue
            reasons = []
            for what in _candidates_for(found, arity):
                key = _check_key(module, found, meth, what)
                if key not in checked:
                    checked[key] = _check(module, plan, meth, what)
                reasons.append(checked[key])
                if checked[key] is None:
                    break
            if reasons and reasons[-1] is None:
                if what == _ONE:
                    report.methods_left.append(
                        SkippedOp(path, f"runs one sampled candidate; nothing to fuse ({type(module).__name__})", meth)
                    )
                else:
                    replaced.append((meth, what))
            else:
                why = reasons[0] if reasons else f"{meth}{_signature(type(module), meth)} is not a sum fastnas knows"
                failed.append((meth, why))
        for meth, why in failed:
            report.methods_left.append(SkippedOp(path, why, meth))
        if not replaced:
            if failed:
                forward = [why for meth, why in failed if meth == "forward"]
                _skip(report, module, path, forward[0] if forward else "; ".join(why for _, why in failed))
            continue
        if "forward" in dict(failed):
            warnings.warn(
                f"fastnas.patch left the forward of {path} ({type(module).__name__}) unchanged: "
                f"{dict(failed)['forward']}",
                PatchWarning,
                stacklevel=2,
            )
        plan = dataclasses.replace(plan, methods=tuple(replaced))
        object.__setattr__(module, _STATE, plan)
        _bind(module)
        e = plan.edges[0]
        report.patched.append(
            PatchedOp(
                path=path,
                style=plan.style,
                candidates=e.plan.kinds,
                skipped_zero=tuple(k for k in range(e.n) if k not in e.plan.active),
                methods=plan.methods,
                how=_how(plan),
                edges=len(plan.edges),
            )
        )
    return report


def _skip(report: PatchReport, module: nn.Module, path: str, reason: str) -> None:
    report.skipped.append(SkippedOp(path, reason))
    warnings.warn(
        f"fastnas.patch left {path} ({type(module).__name__}) unchanged: {reason}",
        PatchWarning,
        stacklevel=3,
    )


def unpatch(model: nn.Module) -> list[str]:
    """Restore every patched mixed op and cell of ``model``; return their paths."""
    restored = []
    for name, module in model.named_modules():
        if _STATE in module.__dict__:
            _restore(module)
            restored.append(_path(name))
    return restored


def _restore(module: nn.Module) -> None:
    for name in list(module.__dict__):
        if isinstance(module.__dict__[name], (_PatchedMethod, _Replicate)):
            del module.__dict__[name]
    del module.__dict__[_STATE]
    module.__dict__.pop(_BOUND, None)


@contextlib.contextmanager
def accelerate(model: nn.Module, backend: str | None = None, memory: str = "save"):
    """``with accelerate(model):`` patch on entry, yield the report, restore on exit.

    Modules that were patched before entering stay patched, with their backend.
    """
    before = {id(m): m.__dict__[_STATE] for m in model.modules() if _STATE in m.__dict__}
    report = patch(model, backend, memory)
    try:
        yield report
    finally:
        for module in model.modules():
            if _STATE not in module.__dict__:
                continue
            if id(module) in before:
                object.__setattr__(module, _STATE, before[id(module)])
            else:
                _restore(module)
