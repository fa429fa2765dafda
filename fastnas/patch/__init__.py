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

The package holds one idea per module: ``recognise`` (which modules are mixed ops or
cells), ``replace`` (the replaced methods; each edge runs through
``fastnas.nn.edge_runner``, as ``fastnas.nn.MixedOp``'s edges do), ``check`` (the
float64 check at patch time) and ``report``; this module is the public API.

Recognition is by structure, since forks rename classes, attributes and methods;
the candidates themselves are read by ``fastnas.nn.edge_plan`` (the one recogniser).

* A **mixed op** holds one ``nn.ModuleList`` of candidates, under any name (``_ops``,
  ``m_ops``, ``ops``, ``layers``, ``candidate_ops``, ...), and nothing else but, in the
  PC-DARTS style, a child (``mp``) that is ``nn.MaxPool2d(2, 2)``; the channel
  proportion 1/K is the module's int attribute ``k`` or, where it keeps none (K
  written into its forward, as PC-DARTS' ImageNet search does), read by probing:
  each K of ``recognise.PROPORTIONS`` is checked in turn (see below) and the first
  that computes what the module does is taken. Every candidate must be one ``edge_plan`` knows:
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
* ``nonzero-sum`` (mixed ops): the same over the candidates whose weight is not
  exactly 0, the others not run (``if w == 0: continue``, as searches that prune
  candidates write it): their batch norms keep their statistics and their weights
  get a zero gradient; the subset is read once per call (one host sync) and runs
  fused (``EdgePlan.restrict``) where the fused edge computes it;

and ``(x, weights, index)`` (GDAS hard samples: ``forward_gdas``), replaced by:

* ``gdas-sum``: ``weights[a] * op_a(x) + sum_{k != a} weights[k]`` with ``a`` the
  sampled index (``index[edge2index[key]].item()`` in a cell): AutoDL's sum, in
  which the other candidates are not run but their hard weights (zero in value)
  still receive the output gradient's sum, as ``fastnas.nn.MixedOp`` computes it.

A method is replaced only when it computes what its replacement does. Besides the
structure, each distinct (class, method, candidate kinds, stride) is checked once
per ``patch`` call: the original method and the replacement run on two float64
copies of the module, in training and in eval mode (and for a weighted sum once
more in training with some weights exactly 0, which tells ``sum`` from
``nonzero-sum``), with the same seeded probe
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
import dataclasses
import warnings
from collections import Counter

import torch.nn as nn

from fastnas import backends
from fastnas.nn.edge_plan import FUSED_MEMORY_MODES, check_memory
from fastnas.patch.check import check_key, check_method
from fastnas.patch.recognise import Plan, Reader, find, replacements_for, signature
from fastnas.patch.replace import STATE, bind, unbind
from fastnas.patch.report import ONE, PatchedOp, PatchReport, PatchWarning, SkippedOp

__all__ = ["PatchReport", "PatchWarning", "PatchedOp", "SkippedOp", "accelerate", "patch", "unpatch"]


def _path(name: str) -> str:
    return name or "<root>"


def _how(plan: Plan) -> str:
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
    reader = Reader()
    checked: dict = {}
    for name, module in model.named_modules():
        path = _path(name)
        if STATE in module.__dict__:
            old = module.__dict__[STATE]
            object.__setattr__(module, STATE, dataclasses.replace(old, backend=backend, memory=memory))
            report.already_patched.append(path)
            continue
        found = find(module, reader)
        if found is None:
            continue
        if isinstance(found, str):
            _skip(report, module, path, found)
            continue
        tries = []
        for reading in found.readings():
            plan = Plan(
                reading.style, reading.attr, reading.edges, backend, memory, (), reading.index_attr, reading.nodes,
                reading.groups or 0, reading.pool,
            )  # fmt: skip
            tries.append((plan, *_replace_methods(module, reading, plan, path, checked)))
            if tries[-1][1]:
                break
        plan, replaced, failed, left = tries[-1] if tries[-1][1] else tries[0]
        if not replaced and len(tries) > 1:
            tried = ", ".join(f"1/{t[0].groups}" for t in tries)
            failed = [(meth, f"with each channel proportion tried ({tried}): {why}") for meth, why in failed]
        report.methods_left.extend(left)
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
        object.__setattr__(module, STATE, plan)
        bind(module)
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
                notes=(f"channel proportion 1/{plan.groups} read by probing",) if len(tries) > 1 else (),
            )
        )
    return report


def _replace_methods(module: nn.Module, found, plan: Plan, path: str, checked: dict):
    """Which methods of ``module`` its replacements compute (checked once per
    ``check_key`` in ``checked``): (replaced, failed with why, methods left as they are)."""
    replaced, failed, left = [], [], []
    for meth, arity in found.methods.items():
        if meth in module.__dict__:
            failed.append((meth, f"its instance already has a {meth} of its own"))
            continue
        reasons = []
        for what in replacements_for(found, arity):
            key = check_key(module, found, meth, what)
            if key not in checked:
                checked[key] = check_method(module, plan, meth, what)
            reasons.append(checked[key])
            if checked[key] is None:
                break
        if reasons and reasons[-1] is None:
            if what == ONE:
                left.append(
                    SkippedOp(path, f"runs one sampled candidate; nothing to fuse ({type(module).__name__})", meth)
                )
            else:
                replaced.append((meth, what))
        else:
            why = reasons[0] if reasons else f"{meth}{signature(type(module), meth)} is not a sum fastnas knows"
            failed.append((meth, why))
    return replaced, failed, left


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
        if STATE in module.__dict__:
            unbind(module)
            restored.append(_path(name))
    return restored


@contextlib.contextmanager
def accelerate(model: nn.Module, backend: str | None = None, memory: str = "save"):
    """``with accelerate(model):`` patch on entry, yield the report, restore on exit.

    Modules that were patched before entering stay patched, with their backend.
    """
    before = {id(m): m.__dict__[STATE] for m in model.modules() if STATE in m.__dict__}
    report = patch(model, backend, memory)
    try:
        yield report
    finally:
        for module in model.modules():
            if STATE not in module.__dict__:
                continue
            if id(module) in before:
                object.__setattr__(module, STATE, before[id(module)])
            else:
                unbind(module)
