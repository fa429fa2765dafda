"""The replaced methods: what a patched mixed op or cell computes, and their binding
to the instance (``PatchedMethod``), undone by ``unbind``."""

from __future__ import annotations

import torch
import torch.nn as nn

from fastnas.nn.edge_plan import EdgePlan
from fastnas.nn.edge_runner import Terms, edge_terms, hard_sample_sum, partial_channel_sum, run_edge, summable
from fastnas.nn.mixed_op import checkpoint_module
from fastnas.ops import channel_shuffle
from fastnas.patch.recognise import Edge, Plan
from fastnas.patch.report import GDAS_SUM, NB201_CELL, NONZERO_SUM, ONE, PC_DARTS

STATE = "_fastnas_patch"
BOUND = "_fastnas_bound"


class PatchedMethod:
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


class Replicate:
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
        replica.__dict__.pop(BOUND, None)  # the original's bound tensors; the replica binds its own
        bind(replica)
        return replica


def bind(module: nn.Module) -> None:
    for name, _ in module.__dict__[STATE].methods:
        object.__setattr__(module, name, PatchedMethod(module, name))
    object.__setattr__(module, "_replicate_for_data_parallel", Replicate(module))


def unbind(module: nn.Module) -> None:
    """Delete what ``bind`` and the replaced methods set on the instance, leaving its
    ``__dict__`` as it was before patching."""
    for name in list(module.__dict__):
        if isinstance(module.__dict__[name], (PatchedMethod, Replicate)) or name in (STATE, BOUND):
            del module.__dict__[name]


def _call(module: nn.Module, name: str, args: tuple, kwargs: dict):
    plan: Plan = module.__dict__[STATE]
    what = dict(plan.methods).get(name)
    out = None if what is None or kwargs else replacement(module, plan, what, args)
    if out is None:
        return getattr(type(module), name)(module, *args, **kwargs)
    return out


def replacement(module: nn.Module, plan: Plan, what: str, args: tuple):
    """What the replaced method computes, or None for a call the fused ops cannot take
    (decided before any candidate runs, so that the original then runs them once)."""
    if len(args) != (3 if what in (GDAS_SUM, ONE) else 2):
        return None
    if plan.style == NB201_CELL:
        return _cell(module, plan, what, *args)
    if what == GDAS_SUM:
        return _mixed_gdas(module, plan, *args)
    if what == ONE:
        return _mixed_one(module, plan, *args)
    return _mixed(module, plan, *args, nonzero=what == NONZERO_SUM)


def _takes_weights(weights, n: int) -> bool:
    return isinstance(weights, torch.Tensor) and weights.dim() == 1 and weights.shape[0] == n


class _Cache:
    """The bound edges of a module (``fastnas.nn.edge_runner.bound_edge``) and the plans
    of its candidate subsets, kept on its instance from the first call that needs one
    on, so that copies and replicas bind their own."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module):
        self.module = module

    def get(self, key):
        cache = self.module.__dict__.get(BOUND)
        return cache.get(key) if isinstance(cache, dict) else None

    def __setitem__(self, key, bound) -> None:
        cache = self.module.__dict__.get(BOUND)
        if not isinstance(cache, dict):
            cache = {}
            object.__setattr__(self.module, BOUND, cache)
        cache[key] = bound


def _original_sum(ops, e: Edge, edge: EdgePlan, terms: Terms, x, weights):
    """The original ``sum(w * op(x))`` of terms the fused sum cannot take: from the
    outputs already computed (zero candidates run now), or term by term."""
    if not terms.outputs:
        return sum(wk * t for wk, t in zip(terms.weights, terms.tensors))
    done = dict(zip(edge.active, terms.tensors))
    kept = range(e.n) if edge is e.plan else [k for k in range(e.n) if weights[k] != 0]
    return sum(weights[k] * (done[k] if k in done else ops[k](x)) for k in kept)


def _nonzero_plan(module: nn.Module, e: Edge, weights: torch.Tensor) -> EdgePlan | None:
    """The plan of the candidates whose weight is not zero (``EdgePlan.restrict``, made
    once per subset), or None when no candidate but zeros is left, which the original
    then sums its own way."""
    keep = tuple(k for k, nonzero in enumerate((weights != 0).tolist()) if nonzero)  # one host sync
    if not any(k in keep for k in e.plan.active):
        return None
    if len(keep) == e.n:
        return e.plan
    cache = _Cache(module)
    key = ("nonzero", e.key, keep)
    plan = cache.get(key)
    if plan is None:
        plan = cache[key] = e.plan.restrict(keep)
    return plan


def _mixed(module: nn.Module, plan: Plan, x, weights, nonzero: bool = False):
    e = plan.edges[0]
    ops = module._modules[plan.attr]
    if len(ops) != e.n or not isinstance(x, torch.Tensor) or not _takes_weights(weights, e.n):
        return None
    edge = _nonzero_plan(module, e, weights) if nonzero else e.plan
    if edge is None:
        return None
    if plan.memory == "checkpoint" and torch.is_grad_enabled():
        return checkpoint_module(module, lambda x, weights: _mixed_sum(module, ops, plan, edge, x, weights), x, weights)
    return _mixed_sum(module, ops, plan, edge, x, weights)


def _mixed_sum(module: nn.Module, ops, plan: Plan, edge: EdgePlan, x: torch.Tensor, weights: torch.Tensor):
    if plan.style == PC_DARTS:
        return _pc_forward(module, ops, plan, edge, x, weights)
    return _weighted_sum(module, plan, plan.edges[0], edge, ops, x, weights)


def _weighted_sum(module: nn.Module, plan: Plan, e: Edge, edge: EdgePlan, ops, x, weights):
    """``sum_k weights[k] * op_k(x)`` of one edge (``fastnas.nn.edge_runner.run_edge``)
    over the candidates ``edge`` computes, the original sum where the fused sum cannot
    take the candidates' outputs."""
    return run_edge(
        x, weights, ops, edge, _Cache(module), backend=plan.backend, memory=plan.memory, training=ops.training,
        key=_key(e, edge), fallback=lambda terms: _original_sum(ops, e, edge, terms, x, weights),
    )  # fmt: skip


def _key(e: Edge, edge: EdgePlan):
    """Where the bound edges of ``edge`` (the edge's plan or a subset's) are kept."""
    return e.key if edge is e.plan else (e.key, edge.active)


def _pc_forward(module: nn.Module, ops, plan: Plan, edge: EdgePlan, x: torch.Tensor, weights: torch.Tensor):
    e = plan.edges[0]
    k = plan.groups
    c = x.shape[1]
    part, bypass = x[:, : c // k], x[:, c // k :]
    terms = edge_terms(
        part, weights, ops, edge, _Cache(module), backend=plan.backend, memory=plan.memory, training=ops.training,
        key=_key(e, edge),
    )  # fmt: skip
    o0 = terms.tensors[0]
    # The original decides on pooling by comparing heights only; so does this.
    pool = o0.dim() == 4 and o0.shape[2] != x.shape[2]
    h, w = bypass.shape[2:]
    fits = (
        summable(terms)
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
        return partial_channel_sum(terms, bypass, k, pool, plan.backend)
    mixed = _original_sum(ops, e, edge, terms, part, weights)
    if mixed.shape[2] == x.shape[2]:
        return channel_shuffle(torch.cat([mixed, bypass], dim=1), k)
    return channel_shuffle(torch.cat([mixed, getattr(module, plan.pool)(bypass)], dim=1), k)


def _pick(index, n: int) -> int | None:
    """A sampled index given as an int or a one-element integer tensor, if in range."""
    if isinstance(index, torch.Tensor) and index.numel() == 1 and not index.is_floating_point():
        index = int(index.item())
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
        return None
    return index


def _gdas_sum(ops, e: Edge, x: torch.Tensor, weights: torch.Tensor, a: int, backend: str | None):
    """``weights[a] * op_a(x) + sum_{k != a} weights[k]`` (``fastnas.nn.edge_runner.hard_sample_sum``)."""
    y = ops[a](x)
    if not isinstance(y, torch.Tensor) or not y.dtype.is_floating_point:
        return sum(weights[k] * y if k == a else weights[k] for k in range(e.n))
    return hard_sample_sum(y, weights, a, "sum", backend)


def _mixed_gdas(module: nn.Module, plan: Plan, x, weights, index):
    e = plan.edges[0]
    ops = module._modules[plan.attr]
    a = _pick(index, e.n)
    if len(ops) != e.n or a is None or not isinstance(x, torch.Tensor) or not _takes_weights(weights, e.n):
        return None
    return _gdas_sum(ops, e, x, weights, a, plan.backend)


def _mixed_one(module: nn.Module, plan: Plan, x, weights, index):
    """What a GDAS method that runs one candidate computes; used only to recognise one."""
    ops = module._modules[plan.attr]
    return ops[index](x) * weights[index]


def _cell(module: nn.Module, plan: Plan, what: str, inputs, weightss, index=None):
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
                out = _gdas_sum(ops, e, nodes[j], weightss[row], picks[row], plan.backend)
            elif plan.memory == "checkpoint" and torch.is_grad_enabled():
                fn = _CellEdge(module, plan, e, ops)
                out = checkpoint_module(ops, fn, nodes[j], weightss[row])
            else:
                out = _weighted_sum(module, plan, e, e.plan, ops, nodes[j], weightss[row])
            total = out if total is None else total + out
        nodes.append(total)
    return nodes[-1]


class _CellEdge:
    __slots__ = ("module", "plan", "edge", "ops")

    def __init__(self, module, plan, edge, ops):
        self.module, self.plan, self.edge, self.ops = module, plan, edge, ops

    def __call__(self, x, weights):
        return _weighted_sum(self.module, self.plan, self.edge, self.edge.plan, self.ops, x, weights)
