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

* every entry of the list is a recognised candidate:

  - zero: a stateless leaf (no children, parameters or buffers) that returns all
    zeros for a probe with no zero entry, in train and in eval mode (probed with the
    RNG state saved and restored, hooks bypassed);
  - identity: a stateless leaf that returns the probe unchanged;
  - ``nn.MaxPool2d`` / ``nn.AvgPool2d``, alone or as ``nn.Sequential(pool, nn.BatchNorm2d)``;
  - identity + dropout: ``nn.Sequential(identity, nn.Dropout, ...)`` (P-DARTS);
  - factorized reduce: children exactly one ``nn.ReLU``, two 1x1 stride-2
    ``nn.Conv2d`` reading the same channels and an ``nn.BatchNorm2d`` over both;
  - convolution chains (ReLUConvBN, SepConv, DilConv, 7x1/1x7): leaf modules, in
    order, only ``nn.ReLU``, ``nn.Conv2d`` (dense or depthwise) and ``nn.BatchNorm2d``,
    starting with a ReLU and ending with a batch norm, with the channel counts
    agreeing link to link;

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
from fastnas.nn.fused_edge import edge_plan
from fastnas.nn.mixed_op import _autocast_on
from fastnas.ops import channel_shuffle, mixed_sum, partial_channel_mixed_sum
from fastnas.ops.darts_edge import darts_edge

__all__ = ["PatchReport", "PatchWarning", "PatchedOp", "SkippedOp", "accelerate", "patch", "unpatch"]

MIXED_OP_LISTS = ("_ops", "m_ops")
PATCH_MEMORY = ("save", "recompute", "sum")
DARTS = "darts"
PC_DARTS = "pc-darts"
_STATE = "_fastnas_patch"


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
    active: tuple[int, ...]
    backend: str | None
    memory: str = "save"
    # Read off the modules once at patch time, so the forward does not probe them.
    kinds: tuple[str, ...] = ()
    stride: int | None = None

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


# --- candidate recognition ---------------------------------------------------------


def _is_stateless_leaf(m: nn.Module) -> bool:
    return not m._modules and not m._parameters and not m._buffers


def _probe(m: nn.Module) -> str | None:
    """'zero' or 'identity' for a stateless leaf behaving as one, else None."""
    # No entry is 0 and both signs occur, so ReLU and friends are not mistaken for zero.
    x = torch.arange(2 * 4 * 6 * 6, dtype=torch.float32).reshape(2, 4, 6, 6) % 7 - 3.5
    results = []
    was_training = m.training
    try:
        for mode in (True, False):
            m.training = mode
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                out = m.forward(x.clone())
            results.append(out)
    except Exception:
        return None
    finally:
        m.training = was_training
    if not all(isinstance(out, torch.Tensor) and out.dim() == 4 for out in results):
        return None
    if all(out.shape == x.shape and torch.equal(out, x) for out in results):
        return "identity"
    if all(out.shape[:2] == x.shape[:2] and out.numel() and not out.any() for out in results):
        return "zero"
    return None


def _conv_chain_kind(m: nn.Module) -> str | None:
    leaves = [leaf for leaf in m.modules() if not leaf._modules]
    if len(leaves) < 3 or not isinstance(leaves[0], nn.ReLU) or not isinstance(leaves[-1], nn.BatchNorm2d):
        return None
    channels = None
    convs = []
    for leaf in leaves:
        if isinstance(leaf, nn.ReLU):
            continue
        if isinstance(leaf, nn.Conv2d):
            if channels is not None and leaf.in_channels != channels:
                return None
            if leaf.groups not in (1, leaf.in_channels):
                return None
            channels = leaf.out_channels
            convs.append(leaf)
        elif isinstance(leaf, nn.BatchNorm2d):
            if channels is None or leaf.num_features != channels:
                return None
        else:
            return None
    if not convs:
        return None
    depthwise = [c for c in convs if c.groups == c.in_channels and c.groups > 1]
    size = "x".join(map(str, convs[0].kernel_size))
    if depthwise and any(c.dilation != (1, 1) for c in depthwise):
        return f"dil_conv_{size}"
    if len(depthwise) == 2 and len(convs) == 4:
        return f"sep_conv_{size}"
    if len(convs) == 1:
        return f"relu_conv_bn_{size}"
    return "conv_chain"


def _is_factorized_reduce(m: nn.Module) -> bool:
    children = list(m.children())
    kinds = Counter(type(c) for c in children)
    if kinds != Counter({nn.ReLU: 1, nn.Conv2d: 2, nn.BatchNorm2d: 1}):
        return False
    convs = [c for c in children if isinstance(c, nn.Conv2d)]
    bn = next(c for c in children if isinstance(c, nn.BatchNorm2d))
    return (
        all(c.kernel_size == (1, 1) and c.stride == (2, 2) for c in convs)
        and convs[0].in_channels == convs[1].in_channels
        and bn.num_features == convs[0].out_channels + convs[1].out_channels
    )


def _candidate_kind(m: nn.Module) -> str | None:
    """The DARTS candidate ``m`` is, by structure, or None."""
    if isinstance(m, nn.MaxPool2d):
        return "max_pool"
    if isinstance(m, nn.AvgPool2d):
        return "avg_pool"
    if _is_stateless_leaf(m):
        return _probe(m)
    if isinstance(m, nn.Sequential) and len(m) >= 2:
        first, rest = m[0], list(m)[1:]
        if isinstance(first, (nn.MaxPool2d, nn.AvgPool2d)) and len(rest) == 1 and isinstance(rest[0], nn.BatchNorm2d):
            return _candidate_kind(first) + "+bn"
        if all(isinstance(r, nn.Dropout) for r in rest) and _is_stateless_leaf(first) and _probe(first) == "identity":
            return "identity+dropout"
    if _is_factorized_reduce(m):
        return "factorized_reduce"
    return _conv_chain_kind(m)


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
    kinds = [_candidate_kind(op) for op in ops]
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
    active = tuple(k for k, kind in enumerate(kinds) if kind != "zero")
    if not active:
        return "every candidate is zero; there is nothing to sum"
    edge_kinds = tuple(
        "chain" if kind.startswith(("sep_conv_", "dil_conv_")) else _EDGE_KINDS.get(kind, "other") for kind in kinds
    )
    return _Plan(
        style=style, attr=attr, n=len(ops), active=active, backend=backend, memory=memory, kinds=edge_kinds,
        stride=_edge_stride(ops),
    )  # fmt: skip


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


# --- the patched forward -----------------------------------------------------------


def _fusable(outs: list[torch.Tensor]) -> bool:
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
    if plan.style == PC_DARTS:
        return _pc_forward(module, ops, plan, x, weights)
    fused = _fused_edge(ops, plan, x, weights)
    if fused is not None:
        return fused
    outs = [ops[k](x) for k in plan.active]
    if not _fusable(outs):
        return _original_sum(ops, plan, outs, x, weights)
    return mixed_sum(outs, weights[plan.active_index], backend=plan.backend)


def _pc_forward(module: nn.Module, ops, plan: _Plan, x: torch.Tensor, weights: torch.Tensor):
    k = module.k
    c = x.shape[1]
    part, bypass = x[:, : c // k], x[:, c // k :]
    fused = _fused_edge(ops, plan, part, weights)
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
        _fusable(outs)
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


_EDGE_KINDS = {
    "zero": "zero",
    "identity": "identity",
    "max_pool+bn": "max",
    "avg_pool+bn": "avg",
    "factorized_reduce": "reduce",
}


def _edge_stride(ops) -> int | None:
    """The edge's stride, read off its candidates' modules."""
    for op in ops:
        for m in op.modules():
            if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.Conv2d)):
                return _pair(m.stride)[0]
    return None


def _fused_edge(ops, plan: _Plan, x, weights):
    """The mixed op through ``fastnas.ops.darts_edge``, or None where it does not apply.

    Applies in training mode to float32/float64 inputs outside autocast when every
    candidate is one the fused edge computes (see ``fastnas.nn.fused_edge``).
    """
    if plan.memory not in ("save", "recompute") or not ops.training:
        return None
    if x.dim() != 4 or x.dtype not in (torch.float32, torch.float64) or _autocast_on(x.device.type):
        return None
    if backends.resolve("darts_edge", x.device, plan.backend) == "reference" or plan.stride not in (1, 2):
        return None
    eplan = edge_plan(list(ops), plan.kinds, x.shape[1], plan.stride)
    if isinstance(eplan, str):
        return None
    if eplan.spec.reduce_index is not None and (x.shape[2] % 2 or x.shape[3] % 2):
        return None
    return darts_edge(
        x, weights, eplan.parameters(), eplan.spec, eplan.buffers(), memory=plan.memory, backend=plan.backend
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
    weighted sum. Patching a patched model again changes nothing but these two.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be an nn.Module, got {type(model).__name__}")
    if memory not in PATCH_MEMORY:
        raise ValueError(f"patch: memory must be one of {PATCH_MEMORY}, got {memory!r}")
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
        ops = module._modules[plan.attr]
        object.__setattr__(module, _STATE, plan)
        _bind(module)
        report.patched.append(
            PatchedOp(
                path=_path(name),
                style=plan.style,
                candidates=tuple(_candidate_kind(op) for op in ops),
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
