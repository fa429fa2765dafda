"""Speed up existing DARTS-family search code in place: ``patch``, ``unpatch``, ``accelerate``.

::

    model = Network(C, num_classes, layers, criterion)   # the user's own code
    fastnas.patch(model)                                  # the one added line

``patch`` finds the mixed ops of a model and replaces, on each instance only, the
``forward`` that sums the candidates with one that sums them through the fused
``fastnas.ops.mixed_sum`` (DARTS, P-DARTS) or ``partial_channel_mixed_sum``
(PC-DARTS). The candidates still run through their own modules, parameters and
buffers: nothing is copied, registered or renamed, so ``state_dict`` keys and
values, checkpoints, optimisers and hooks are untouched. ``nn.DataParallel`` replicas,
deep copies and pickles of a patched model run their own modules. ``unpatch`` deletes
the instance attributes again, leaving each module's ``__dict__`` as it was.

Recognition is by structure, since forks rename classes. A module is a mixed op when
it holds an ``nn.ModuleList`` named ``_ops`` (DARTS, PC-DARTS) or ``m_ops`` (P-DARTS)
and its class ``forward`` takes exactly ``(x, weights)``; lists of mixed ops (cells)
are containers and are passed over silently. It is patched when, in addition:

* every entry of the list is a recognised candidate (``fastnas.nn.edge_plan``): zero
  and identity (stateless leaves, probed), max/avg pools alone or followed by a batch
  norm, identity + dropout (P-DARTS), the factorized reduce, and ReLU/Conv2d/BatchNorm2d
  convolution chains (ReLUConvBN, SepConv, DilConv, 7x1/1x7);

* it has no other child modules, except for the PC-DARTS style: a child ``mp`` that is
  ``nn.MaxPool2d(2, 2)`` together with an int attribute ``k`` (the channel proportion);
* its instance has no ``forward`` of its own already.

Anything else that looks like a mixed op is left exactly as it was and named in a
``PatchWarning`` and in the report, with the reason.

The patched forward calls the non-zero candidates in their original order, so the
random numbers drawn (P-DARTS dropout) and the batch-norm statistics updated are
those of the original. Zero candidates are not run: their term is exactly 0, and
their weights still receive their exact (zero) gradient through the indexing of
``weights``. The one result that can differ is on inputs holding inf or NaN, where
the original's ``0 * x`` term would be NaN. Calls the fused ops cannot take (weights
that are not a 1-D tensor of one entry per candidate, candidates whose outputs
disagree in shape, dtype or device, a list edited since patching) are computed the
original way.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from fastnas import backends
from fastnas.nn.edge_plan import EdgePlan, check_memory, plan_edge
from fastnas.nn.mixed_op import checkpoint_module
from fastnas.ops import channel_shuffle, mixed_sum, partial_channel_mixed_sum
from fastnas.ops.darts_edge import darts_edge

__all__ = ["PatchReport", "PatchWarning", "PatchedOp", "SkippedOp", "accelerate", "patch", "unpatch"]

MIXED_OP_LISTS = ("_ops", "m_ops")
DARTS = "darts"
PC_DARTS = "pc-darts"
_STATE = "_fastnas_patch"
_BOUND = "_fastnas_bound"


class PatchWarning(UserWarning):
    """A mixed op that ``fastnas.patch`` left unchanged."""


@dataclass(frozen=True)
class PatchedOp:
    path: str
    style: str
    candidates: tuple[str, ...]
    skipped_zero: tuple[int, ...]


@dataclass(frozen=True)
class SkippedOp:
    path: str
    reason: str


@dataclass
class PatchReport:
    """What one ``patch`` call changed (``patched``), found already patched, and left alone."""

    backend: str | None
    patched: list[PatchedOp] = field(default_factory=list)
    already_patched: list[str] = field(default_factory=list)
    skipped: list[SkippedOp] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"fastnas.patch (backend: {self.backend or 'auto'}): {len(self.patched)} mixed ops patched, "
            f"{len(self.already_patched)} already patched, {len(self.skipped)} left unchanged"
        ]
        groups = Counter((op.style, op.candidates, len(op.skipped_zero)) for op in self.patched)
        for (style, cands, zeros), count in sorted(groups.items()):
            note = f"; {zeros} zero candidate(s) not run" if zeros else ""
            lines.append(f"  patched {count:4d} x {style}: [{', '.join(cands)}]{note}")
        for op in self.skipped:
            lines.append(f"  unchanged {op.path}: {op.reason}")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Plan:
    """Everything the patched forward needs: plain data, so copies and pickles stay valid."""

    style: str
    attr: str
    n: int
    backend: str | None
    memory: str
    # The candidates read once, at patch time.
    edge: EdgePlan

    @property
    def active(self) -> tuple[int, ...]:
        return self.edge.active

    @property
    def active_index(self):
        a = self.active
        # A slice is a view and its backward a narrow copy, cheaper than gathering.
        if a == tuple(range(a[0], a[-1] + 1)):
            return slice(a[0], a[-1] + 1)
        return list(a)


class _PatchedForward:
    """The instance ``forward`` of a patched mixed op.

    A callable object rather than a closure, so ``copy.deepcopy`` and pickling of a
    patched model rebind it to the copied module instead of the original one.
    """

    __slots__ = ("module",)

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, x, weights):
        return _forward(self.module, x, weights)

    def __repr__(self) -> str:
        return f"<fastnas patched forward of {type(self.module).__name__}>"


class _Replicate:
    """The instance ``_replicate_for_data_parallel`` of a patched mixed op.

    ``nn.DataParallel`` builds each replica from a shallow copy of the module's
    ``__dict__``, which would leave the replica's forward running the original
    module; this rebinds the copy to the replica.
    """

    __slots__ = ("module",)

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self):
        replica = type(self.module)._replicate_for_data_parallel(self.module)
        _bind(replica)
        return replica


_INSTANCE_ATTRS = {"forward": _PatchedForward, "_replicate_for_data_parallel": _Replicate}


def _bind(module: nn.Module) -> None:
    for name, cls in _INSTANCE_ATTRS.items():
        object.__setattr__(module, name, cls(module))


# --- mixed-op recognition ----------------------------------------------------------


def _op_list(module: nn.Module) -> tuple[str, nn.ModuleList] | None:
    for attr in MIXED_OP_LISTS:
        ops = module._modules.get(attr)
        if isinstance(ops, nn.ModuleList):
            return attr, ops
    return None


def _takes_x_and_weights(module: nn.Module) -> bool:
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return len(params) == 2 and all(p.kind in plain for p in params)


def _plan(module: nn.Module, backend: str | None, memory: str = "save") -> _Plan | str | None:
    """A plan for patching ``module``, the reason it cannot be patched, or None if no mixed op."""
    found = _op_list(module)
    if found is None:
        return None
    attr, ops = found
    if any(_op_list(op) is not None for op in ops):
        return None  # a cell: a list of mixed ops, each handled on its own
    edge = plan_edge(ops)
    kinds = edge.kinds
    if not _takes_x_and_weights(module):
        if not any(kinds):
            return None  # some other module that happens to own such a list
        sig = inspect.signature(type(module).forward)
        return f"its forward{sig} does not take exactly (x, weights)"
    if not ops:
        return f"{attr} is empty"
    for k, (op, kind) in enumerate(zip(ops, kinds)):
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
    for name, cls in _INSTANCE_ATTRS.items():
        if name in module.__dict__ and not isinstance(module.__dict__[name], cls):
            return f"its instance already has a {name} of its own"
    if not edge.active:
        return "every candidate is zero; there is nothing to sum"
    return _Plan(style=style, attr=attr, n=len(ops), backend=backend, memory=memory, edge=edge)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


# --- the patched forward -----------------------------------------------------------


def _summable(outs: list[torch.Tensor]) -> bool:
    o0 = outs[0]
    return (
        all(
            isinstance(o, torch.Tensor) and o.shape == o0.shape and o.dtype == o0.dtype and o.device == o0.device
            for o in outs
        )
        and o0.dtype.is_floating_point
    )


def _original_sum(ops, plan: _Plan, outs: list[torch.Tensor], x, weights):
    """The original ``sum(w * op(x))`` from outputs already computed (zero ones run now)."""
    done = dict(zip(plan.active, outs))
    return sum(w * (done[k] if k in done else ops[k](x)) for k, w in zip(range(plan.n), weights))


def _forward(module: nn.Module, x, weights):
    plan: _Plan = module.__dict__[_STATE]
    ops = module._modules[plan.attr]
    if (
        len(ops) != plan.n
        or not isinstance(x, torch.Tensor)
        or not isinstance(weights, torch.Tensor)
        or weights.dim() != 1
        or weights.shape[0] != plan.n
    ):
        return type(module).forward(module, x, weights)
    if plan.memory == "checkpoint" and torch.is_grad_enabled():
        return checkpoint_module(module, lambda x, weights: _sum_forward(module, ops, plan, x, weights), x, weights)
    return _sum_forward(module, ops, plan, x, weights)


def _sum_forward(module: nn.Module, ops, plan: _Plan, x: torch.Tensor, weights: torch.Tensor):
    if plan.style == PC_DARTS:
        return _pc_forward(module, ops, plan, x, weights)
    fused = _fused_edge(module, ops, plan, x, weights)
    if fused is not None:
        return fused
    outs = [ops[k](x) for k in plan.active]
    if not _summable(outs):
        return _original_sum(ops, plan, outs, x, weights)
    return mixed_sum(outs, weights[plan.active_index], backend=plan.backend)


def _pc_forward(module: nn.Module, ops, plan: _Plan, x: torch.Tensor, weights: torch.Tensor):
    k = module.k
    c = x.shape[1]
    part, bypass = x[:, : c // k], x[:, c // k :]
    fused = _fused_edge(module, ops, plan, part, weights)
    if fused is not None and bypass.shape[1] > 0 and (fused.shape[1] + bypass.shape[1]) % k == 0:
        pool = fused.shape[2] != x.shape[2]
        if not pool or (bypass.shape[2] % 2 == 0 and bypass.shape[3] % 2 == 0):
            return partial_channel_mixed_sum([fused], weights.new_ones(1), bypass, k, pool, backend=plan.backend)
    outs = [ops[i](part) for i in plan.active]
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
        return partial_channel_mixed_sum(outs, weights[plan.active_index], bypass, k, pool, backend=plan.backend)
    mixed = _original_sum(ops, plan, outs, part, weights)
    if mixed.shape[2] == x.shape[2]:
        return channel_shuffle(torch.cat([mixed, bypass], dim=1), k)
    return channel_shuffle(torch.cat([mixed, module.mp(bypass)], dim=1), k)


def _fused_edge(module: nn.Module, ops, plan: _Plan, x, weights):
    """The mixed op through ``fastnas.ops.darts_edge``, or None where the edge's plan
    says it cannot run fused (``fastnas.nn.edge_plan.EdgePlan.fused_reason``)."""
    if plan.edge.fused_reason(x, plan.backend, training=ops.training, memory=plan.memory) is not None:
        return None
    bound = module.__dict__.get(_BOUND)
    if bound is None or bound.candidates is not ops:
        bound = plan.edge.bind(ops)
        object.__setattr__(module, _BOUND, bound)
    return darts_edge(
        x, weights, bound.parameters(), plan.edge.spec, bound.buffers(), memory=plan.memory, backend=plan.backend
    )


# --- public API --------------------------------------------------------------------


def _path(name: str) -> str:
    return name or "<root>"


def patch(model: nn.Module, backend: str | None = None, memory: str = "save") -> PatchReport:
    """Route the mixed ops of ``model`` through the fused ops, in place; return a report.

    ``backend``: the fastnas backend of the fused ops (None: chosen per call, as for
    ``fastnas.ops``; ``use_backend`` and FASTNAS_BACKEND apply). ``memory``: in
    training mode, mixed ops whose candidates are all ones the fused edge computes
    (``fastnas.ops.darts_edge``) keep only their pre-BN tensors ("save") or nothing
    ("recompute", recomputed inside the fused backward); "sum" fuses only the
    weighted sum; "checkpoint" runs the patched mixed op under
    ``torch.utils.checkpoint``. Patching a patched model again changes nothing but
    these two settings.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be an nn.Module, got {type(model).__name__}")
    check_memory(memory, "patch: memory")
    if backend is not None:
        backends.requested_backend(backend)  # an unknown name fails here, not mid-step
    report = PatchReport(backend=backend)
    for name, module in model.named_modules():
        plan = _plan(module, backend, memory)
        if plan is None:
            continue
        if isinstance(plan, str):
            report.skipped.append(SkippedOp(_path(name), plan))
            warnings.warn(
                f"fastnas.patch left {_path(name)} ({type(module).__name__}) unchanged: {plan}",
                PatchWarning,
                stacklevel=2,
            )
            continue
        if _STATE in module.__dict__:
            object.__setattr__(module, _STATE, plan)
            report.already_patched.append(_path(name))
            continue
        object.__setattr__(module, _STATE, plan)
        _bind(module)
        report.patched.append(
            PatchedOp(
                path=_path(name),
                style=plan.style,
                candidates=plan.edge.kinds,
                skipped_zero=tuple(k for k in range(plan.n) if k not in plan.active),
            )
        )
    return report


def unpatch(model: nn.Module) -> list[str]:
    """Restore every patched mixed op of ``model``; return their paths."""
    restored = []
    for name, module in model.named_modules():
        if _STATE in module.__dict__:
            _restore(module)
            restored.append(_path(name))
    return restored


def _restore(module: nn.Module) -> None:
    for name, cls in _INSTANCE_ATTRS.items():
        if isinstance(module.__dict__.get(name), cls):
            del module.__dict__[name]
    del module.__dict__[_STATE]
    module.__dict__.pop(_BOUND, None)


@contextlib.contextmanager
def accelerate(model: nn.Module, backend: str | None = None, memory: str = "save"):
    """``with accelerate(model):`` patch on entry, yield the report, restore on exit.

    Mixed ops that were patched before entering stay patched, with their backend.
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
