"""Mixed operations: one supernet edge holding every candidate operation.

``MixedOp`` returns ``sum_k w_k * op_k(x)`` through the fused ``mixed_sum``;
``PartialChannelMixedOp`` (PC-DARTS) sends only the first C/K channels through
the candidates and the rest around them, through ``partial_channel_mixed_sum``.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastnas.nn.edge_plan import BoundEdge, EdgePlan, check_memory, plan_edge
from fastnas.nn.edge_runner import (
    Terms,
    bound_edge,
    edge_terms,
    fused_edge,
    hard_sample_sum,
    partial_channel_sum,
    run_edge,
)
from fastnas.nn.operations import OPS, check_primitives

#: How an edge computes a GDAS hard sample (``MixedOp``): "sum", the sampled candidate
#: times its hard weight plus the other hard weights (AutoDL's NAS-Bench-201 GDAS), or
#: "one", the sampled candidate times its hard weight alone (AutoDL's NASNet-space GDAS).
HARD_FORMS = ("sum", "one")


@contextlib.contextmanager
def _frozen_batch_norm_stats(module: nn.Module):
    """Leave batch-norm running statistics as they were while a checkpoint recomputes.

    The recomputation is a second forward pass over the same batch; without
    this it would update the running mean and variance twice per step.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{name: buf.clone() for name, buf in m.named_buffers(recurse=False) if buf is not None} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for name, value in buffers.items():
                    getattr(m, name).copy_(value)


class _Bound(nn.Module):
    """``fn`` as the forward of a module that owns ``module``, for functional_call."""

    def __init__(self, module: nn.Module, fn):
        super().__init__()
        self.module = module
        object.__setattr__(self, "fn", fn)  # not a second registration when fn is the module itself

    def forward(self, *args):
        return self.fn(*args)


def checkpoint_module(module: nn.Module, fn, *args, preserve_rng_state: bool = True):
    """``fn(*args)``, a computation of ``module``, under ``torch.utils.checkpoint``.

    The module's parameters are explicit inputs of the checkpoint: under
    ``torch.func.functional_call`` (as second-order DARTS runs the network) the
    recomputation then sees the tensors the forward saw, not the module's own.
    Batch-norm running statistics are updated by the forward only. Under
    ``torch.compile`` it is ``fn(*args)``: the compiler's partitioner decides what
    backward recomputes (dynamo cannot trace the checkpoint's context function).
    """
    if torch.compiler.is_compiling():
        return fn(*args)
    named = list(module.named_parameters())
    names = ["module." + n for n, _ in named]
    bound = _Bound(module, fn)

    def run(*inputs):
        params = dict(zip(names, inputs[len(args) :]))
        return torch.func.functional_call(bound, params, inputs[: len(args)], strict=False)

    return checkpoint(
        run, *args, *(p for _, p in named), use_reentrant=False, preserve_rng_state=preserve_rng_state,
        context_fn=lambda: (contextlib.nullcontext(), _frozen_batch_norm_stats(module)),
    )  # fmt: skip


class MixedOp(nn.Module):
    """Weighted sum of every candidate operation on one edge (DARTS).

    Args:
        C: channels in and out.
        stride: 1, or 2 on the edges of a reduction cell that leave its inputs.
        primitives: candidate names, keys of ``fastnas.nn.OPS``.
        affine: affine batch norm inside the candidates (False during search).
        pool_bn: follow pooling candidates with a non-affine batch norm, as DARTS
            does in search so their scale matches the convolutions'.
        backend: fastnas backend of the fused ops (None: the usual choice;
            "reference" runs the eager candidate modules, the oracle).
        memory: what the edge keeps for backward. "save" (default): the fused
            edge (``fastnas.ops.darts_edge``) keeps only the pre-BN tensors its
            weighted sum normalises; "recompute": it keeps nothing and recomputes the candidates
            inside its backward; "checkpoint": the eager candidate modules under
            ``torch.utils.checkpoint`` (a baseline); "sum": the eager candidate
            modules, their weighted sum fused.

    The candidates are read once, at construction (``self.plan``, see
    ``fastnas.nn.edge_plan``). In training mode, an edge whose candidates are all
    DARTS primitives runs fused: every candidate and the weighted sum in a few
    kernels, batch norms folded into the sum, pooling computed inside it.
    Otherwise (other primitives, eval mode, autocast, dtypes other than float32
    and float64, GDAS ``index``, a limit of the kernels) the candidate modules run
    one by one and their outputs go through the fused ``mixed_sum``; with
    ``memory="recompute"`` such an edge is checkpointed. ``fused_reason`` says why
    the last call did not run fused (None when it did).

    ``forward(x, weights, index=None)``: ``weights`` has one entry per candidate.
    With an int ``index`` only that candidate is run (GDAS hard sampling), in the
    form ``hard_form`` names (see ``HARD_FORMS``): "sum" (the default),
    ``weights[index] * op_index(x) + sum_{k != index} weights[k]``, as AutoDL's
    NAS-Bench-201 GDAS (``NAS201SearchCell.forward_gdas`` in
    ``xautodl/models/cell_searchs/search_cells.py``): the other hard weights are 0
    in value, but their straight-through gradient reaches every architecture
    parameter of the edge; "one", ``weights[index] * op_index(x)`` alone, as
    AutoDL's NASNet-space GDAS (``MixedOp.forward_gdas`` in the same file).
    With a tuple ``index`` (a path of a single-path or
    one-shot supernet) the listed candidates run and are summed, unweighted:
    ``weights`` is not read, nothing else runs, and an empty tuple (or only
    ``none``) gives zeros. Such a subset runs fused when the fused edge can
    compute it, from a plan restricted once per subset (``EdgePlan.restrict``).
    ``none`` candidates contribute exactly zero and are skipped in the sum; their
    weights still receive their (zero) gradient.
    """

    def __init__(
        self,
        C: int,
        stride: int,
        primitives,
        affine: bool = False,
        pool_bn: bool = True,
        backend: str | None = None,
        memory: str = "save",
    ):
        super().__init__()
        self.primitives = check_primitives(primitives)
        self.stride = stride
        self.backend = backend
        self.memory = check_memory(memory)
        self.skip_drop_prob = 0.0
        self.hard_form = "sum"
        self.ops = nn.ModuleList()
        for name in self.primitives:
            op = OPS[name](C, stride, affine)
            if pool_bn and "pool" in name:
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            self.ops.append(op)
        self.plan = plan_edge(self.ops, C, stride)
        self._bound: dict = {}  # the bound edge (fastnas.nn.edge_runner.bound_edge)
        # Why the last call did not run the fused edge (None when it did); before
        # any call, why the candidates cannot be fused at all.
        self.fused_reason = self.plan.reason
        # P-DARTS drops out the identity shortcut only, not the reducing one.
        self._dropped = {k for k, name in enumerate(self.primitives) if name == "skip_connect" and stride == 1}
        # With skip dropout active the identity term is added outside the fused edge.
        self._spec_no_skip = None
        if self.plan.spec is not None and self.plan.spec.skip_index is not None:
            self._spec_no_skip = dataclasses.replace(self.plan.spec, skip_index=None)
        # Path subsets: their restricted plans and bound edges, made once per subset.
        self._path_plans: dict[tuple, EdgePlan] = {}
        self._path_bound: dict[tuple, BoundEdge] = {}

    def replan(self) -> None:
        """Read the candidates again, after their batch norms changed (``SuperNet.use_batch_statistics``)."""
        self.plan = plan_edge(self.ops, None, self.stride)
        self._bound = {}
        self.fused_reason = self.plan.reason
        self._spec_no_skip = None
        if self.plan.spec is not None and self.plan.spec.skip_index is not None:
            self._spec_no_skip = dataclasses.replace(self.plan.spec, skip_index=None)
        self._path_plans, self._path_bound = {}, {}

    def _candidate(self, k: int, x: torch.Tensor) -> torch.Tensor:
        out = self.ops[k](x)
        if k in self._dropped and self.skip_drop_prob > 0 and self.training:
            out = F.dropout(out, p=self.skip_drop_prob)
        return out

    def _fusable(self, x: torch.Tensor, index: int | None) -> bool:
        """Whether this call runs the fused edge; records why not in ``fused_reason``."""
        training = self.training and index is None
        self.fused_reason = self.plan.fused_reason(x, self.backend, training=training, memory=self.memory)
        return self.fused_reason is None

    def _bound_edge(self) -> BoundEdge:
        return bound_edge(self._bound, None, self.plan, self.ops)

    def _fused(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        spec, extra = self.plan.spec, None
        if self._spec_no_skip is not None and self.skip_drop_prob > 0:
            spec = self._spec_no_skip
            k = self.plan.spec.skip_index
            extra = weights[k] * F.dropout(x, p=self.skip_drop_prob)
        out = fused_edge(x, weights, self._bound_edge(), spec, backend=self.backend, memory=self.memory)
        return out if extra is None else out + extra

    def _path_plan(self, active: tuple) -> EdgePlan:
        plan = self._path_plans.get(active)
        if plan is None:
            plan = self._path_plans[active] = self.plan.restrict(active)
        return plan

    def _path_edge(self, x: torch.Tensor, keep: tuple) -> torch.Tensor:
        """The unweighted sum of the candidates ``keep``: only they run (see the class docstring)."""
        active = tuple(k for k in self.plan.active if k in keep)
        if not active:
            return self._zeros(x)
        plan = self._path_plan(active)
        skip = plan.spec is not None and plan.spec.skip_index is not None
        if skip and self.skip_drop_prob > 0 and self.training:
            self.fused_reason = "skip dropout on a path runs the candidate modules"
        else:
            self.fused_reason = plan.fused_reason(x, self.backend, training=self.training, memory=self.memory)
        if self.fused_reason is None:
            bound = bound_edge(self._path_bound, active, plan, self.ops)
            ones = x.new_ones(len(self.ops), dtype=torch.float32)
            return fused_edge(x, ones, bound, plan.spec, backend=self.backend, memory=self.memory)
        if self._recompute_unfused():
            return checkpoint_module(self, lambda x: self._path_modules(x, active), x)
        return self._path_modules(x, active)

    def _path_modules(self, x: torch.Tensor, active: tuple) -> torch.Tensor:
        out = self._candidate(active[0], x)
        for k in active[1:]:
            out = out + self._candidate(k, x)
        return out

    def _zeros(self, x: torch.Tensor) -> torch.Tensor:
        # Multiplied rather than allocated, as the Zero candidate: the input stays in the graph.
        return (x if self.stride == 1 else x[:, :, :: self.stride, :: self.stride]).mul(0.0)

    def _edge(self, x: torch.Tensor, weights: torch.Tensor, index) -> torch.Tensor:
        """``sum_k weights[k] * op_k(x)`` for this edge's (part of the) input."""
        if isinstance(index, tuple):
            return self._path_edge(x, index)
        if self._fusable(x, index):
            return self._fused(x, weights)
        if self._recompute_unfused():
            return self._checkpointed(self._unfused, x, weights, index)
        return self._unfused(x, weights, index)

    def _recompute_unfused(self) -> bool:
        """An edge the fused engine does not take, asked to recompute: checkpoint its modules."""
        return self.memory == "recompute" and torch.is_grad_enabled() and self.training

    def _checkpointed(self, fn, x, weights, index):
        """``fn(x, weights, index)`` under ``torch.utils.checkpoint``, BN statistics updated once.

        The random state is kept for the recomputation only when the edge draws from it
        (P-DARTS' skip dropout): keeping it reads the CUDA generator's state, which a
        CUDA-graph capture does not allow.
        """
        draws = bool(self._dropped) and self.skip_drop_prob > 0 and self.training
        return checkpoint_module(self, lambda x, weights: fn(x, weights, index), x, weights, preserve_rng_state=draws)

    def _unfused(self, x: torch.Tensor, weights: torch.Tensor, index: int | None) -> torch.Tensor:
        if index is not None:
            return hard_sample_sum(self._candidate(index, x), weights, index, self.hard_form, self.backend)
        return run_edge(
            x, weights, self.ops, self.plan, self._bound, backend=self.backend, memory=self.memory,
            training=self.training, fuse=False, run=self._candidate,
        )  # fmt: skip

    def _forward(self, x: torch.Tensor, weights: torch.Tensor, index: int | None) -> torch.Tensor:
        return self._edge(x, weights, index)

    def _check_weights(self, weights: torch.Tensor) -> None:
        if weights.dim() != 1 or weights.shape[0] != len(self.ops):
            raise ValueError(
                f"MixedOp: weights must have shape ({len(self.ops)},) for candidates {self.primitives}, "
                f"got {tuple(weights.shape)}"
            )

    def forward(self, x: torch.Tensor, weights: torch.Tensor, index=None) -> torch.Tensor:
        self._check_weights(weights)
        if self.memory == "checkpoint" and torch.is_grad_enabled():
            return self._checkpointed(self._forward, x, weights, index)
        return self._forward(x, weights, index)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, primitives={self.primitives}, memory={self.memory!r}"


class PartialChannelMixedOp(MixedOp):
    """PC-DARTS edge: the first C/K channels go through the candidates, the rest bypass.

    The output is ``channel_shuffle(cat([sum_k w_k op_k(x[:, :C/K]), bypass]), K)``,
    where the bypass ``x[:, C/K:]`` is max-pooled 2x2 on stride-2 edges. The sum,
    pooling, concatenation and shuffle are one fused op. Arguments are those of
    ``MixedOp`` plus ``groups`` (K).
    """

    def __init__(
        self,
        C: int,
        stride: int,
        primitives,
        groups: int,
        affine: bool = False,
        pool_bn: bool = True,
        backend: str | None = None,
        memory: str = "save",
    ):
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"partial channels K must be a positive int, got {groups!r}")
        if C % groups:
            raise ValueError(f"partial channels K={groups} must divide the edge's {C} channels")
        super().__init__(C // groups, stride, primitives, affine, pool_bn, backend, memory)
        self.groups = groups
        self.channels = C
        # A hard sample's other weights have no place in the shuffled concatenation.
        self.hard_form = "one"

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the channels through the candidates, the bypass channels) of the edge input."""
        cp = self.channels // self.groups
        return x[:, :cp], x[:, cp:]

    def mixed(self, x: torch.Tensor, weights: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """``sum_k w_k op_k(x[:, :C/K])`` alone, for a node that does the rest (``Cell``)."""
        self._check_weights(weights)
        _no_path(index)
        self._check_hard_form(index)
        part, _ = self.split(x)
        if self.memory == "checkpoint" and torch.is_grad_enabled():
            return self._checkpointed(self._edge, part, weights, index)
        return self._edge(part, weights, index)

    def _check_hard_form(self, index) -> None:
        if index is not None and self.hard_form != "one":
            raise ValueError(
                f"PartialChannelMixedOp: GDAS hard samples take the 'one' form with partial channels, "
                f"got hard_form={self.hard_form!r}"
            )

    def _forward(self, x: torch.Tensor, weights: torch.Tensor, index: int | None) -> torch.Tensor:
        _no_path(index)
        self._check_hard_form(index)
        part, bypass = self.split(x)
        if self._fusable(part, index) or self._recompute_unfused():
            # The fused edge, or its checkpointed fallback (see _edge).
            terms = Terms([self._edge(part, weights, index)], weights.new_ones(1), False)
        elif index is not None:
            terms = Terms([self._candidate(index, part)], weights[index : index + 1], True)
        else:
            terms = edge_terms(
                part, weights, self.ops, self.plan, self._bound, backend=self.backend, memory=self.memory,
                training=self.training, fuse=False, run=self._candidate,
            )  # fmt: skip
        return partial_channel_sum(terms, bypass, self.groups, self.stride == 2, self.backend)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, " + super().extra_repr()


def check_hard_form(form: str) -> str:
    """``form`` if it is one of ``HARD_FORMS``; ValueError naming them otherwise."""
    if form not in HARD_FORMS:
        raise ValueError(f"GDAS hard-sample form must be one of {HARD_FORMS}, got {form!r}")
    return form


def _no_path(index) -> None:
    if isinstance(index, tuple):
        raise ValueError(
            "PartialChannelMixedOp: paths (a tuple index) are not supported with partial channels; "
            "single-path and one-shot supernets run whole edges"
        )
