"""Running one edge: the fused edge where it computes the call, else the candidate
modules and the fused weighted sum.

``fastnas.nn.MixedOp`` and the methods ``fastnas.patch`` puts on the mixed ops and
cells of other code both hold an edge's candidate modules and their ``EdgePlan``
(``fastnas.nn.edge_plan``); both compute with them, through the functions here:

* the weighted sum ``sum_k weights[k] * op_k(x)`` (``run_edge``): the fused edge
  (``fastnas.ops.darts_edge``) where the plan takes the call, else, where the plan
  has a fused part, that part fused beside the other candidates' outputs, else every
  non-zero candidate's output through ``fastnas.ops.mixed_sum``;
* PC-DARTS' partial-channel edge: the same terms (``edge_terms``) of the first C/K
  channels, through ``partial_channel_mixed_sum`` (``partial_channel_sum``);
* a GDAS hard sample (``hard_sample_sum``): the sampled candidate times its weight,
  plus, in the "sum" form, the other weights.

Candidates that run as modules run in their original order, so the random numbers
they draw and the batch-norm statistics they update are those of the eager edge.
Zero candidates are not run: their term is exactly 0, and their weights still
receive their (zero) gradient through the indexing of ``weights``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from fastnas.nn.edge_plan import BoundEdge, EdgePlan
from fastnas.ops import mixed_sum, partial_channel_mixed_sum
from fastnas.ops.darts_edge import EdgeSpec, darts_edge


class Terms(NamedTuple):
    """An edge's weighted sum before it is summed: ``sum_k weights[k] * tensors[k]``.

    ``outputs``: the tensors are the non-zero candidates' outputs, in order; else the
    first is a fused edge's (or fused part's) output, with weight 1.
    """

    tensors: list[torch.Tensor]
    weights: torch.Tensor
    outputs: bool

    @property
    def lone_fused(self) -> bool:
        """A whole fused edge alone: its output is the sum."""
        return not self.outputs and len(self.tensors) == 1


def bound_edge(cache, key, plan: EdgePlan, candidates) -> BoundEdge:
    """``plan`` bound to ``candidates``, kept in ``cache`` (a dict, or anything with its
    ``get`` and item assignment) under ``key`` and bound again when the plan or any
    candidate module changed since."""
    bound = cache.get(key)
    if (
        bound is None
        or bound.plan is not plan
        or len(bound.candidates) != len(candidates)
        or any(a is not b for a, b in zip(bound.candidates, candidates))
    ):
        bound = cache[key] = plan.bind(candidates)
    return bound


def fused_edge(
    x: torch.Tensor,
    weights: torch.Tensor,
    bound: BoundEdge,
    spec: EdgeSpec,
    *,
    backend: str | None,
    memory: str,
) -> torch.Tensor:
    """The bound candidates' weighted sum through ``fastnas.ops.darts_edge``."""
    return darts_edge(x, weights, bound.parameters(), spec, bound.buffers(), memory=memory, backend=backend)


def active_index(active: tuple[int, ...]) -> slice | list[int]:
    """The index of ``weights`` that picks the candidates ``active``."""
    # A slice is a view and its backward a narrow copy, cheaper than gathering.
    if active == tuple(range(active[0], active[-1] + 1)):
        return slice(active[0], active[-1] + 1)
    return list(active)


def _run_module(candidates):
    return lambda k, x: candidates[k](x)


def edge_terms(
    x: torch.Tensor,
    weights: torch.Tensor,
    candidates,
    plan: EdgePlan,
    cache,
    *,
    backend: str | None,
    memory: str,
    training: bool,
    fuse: bool = True,
    run: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    key=None,
) -> Terms:
    """The edge's weighted sum as ``Terms``: the whole fused edge, the fused part and
    the other candidates' outputs, or every non-zero candidate's output.

    ``fuse``: whether the plan decides whether the call runs fused (for the whole
    edge, then its part), in ``training`` mode; False where the caller has decided
    it does not. ``run(k, x)`` runs candidate ``k`` (default: ``candidates[k](x)``).
    ``cache`` keeps the bound edges, under ``key`` (an edge of a cell: its key).
    """
    run = run or _run_module(candidates)
    if fuse:
        if plan.fused_reason(x, backend, training=training, memory=memory) is None:
            bound = bound_edge(cache, (key, "edge"), plan, candidates)
            y = fused_edge(x, weights, bound, plan.spec, backend=backend, memory=memory)
            return Terms([y], weights.new_ones(1), False)
        part = plan.part
        if part is not None and part.fused_reason(x, backend, training=training, memory=memory) is None:
            index = list(plan.part_index)
            bound = bound_edge(cache, (key, "part"), part, [candidates[i] for i in index])
            y = fused_edge(x, weights[index], bound, part.spec, backend=backend, memory=memory)
            rest = plan.rest
            outs = [run(k, x) for k in rest]
            return Terms([y, *outs], torch.cat([weights.new_ones(1), weights[list(rest)]]), False)
    # An edge of only zeros still needs an output of the right shape: its first candidate's.
    active = plan.active or (0,)
    return Terms([run(k, x) for k in active], weights[active_index(active)], True)


def summable(terms: Terms) -> bool:
    """Whether the terms go through the fused weighted sum: floating-point tensors
    alike in shape, dtype and device."""
    t0 = terms.tensors[0]
    return (
        all(
            isinstance(t, torch.Tensor) and t.shape == t0.shape and t.dtype == t0.dtype and t.device == t0.device
            for t in terms.tensors
        )
        and t0.dtype.is_floating_point
    )


def weighted_sum(terms: Terms, backend: str | None) -> torch.Tensor:
    """``sum_k weights[k] * tensors[k]``; a lone fused edge is its own sum."""
    if terms.lone_fused:
        return terms.tensors[0]
    return mixed_sum(terms.tensors, terms.weights, backend=backend)


def run_edge(
    x: torch.Tensor,
    weights: torch.Tensor,
    candidates,
    plan: EdgePlan,
    cache,
    *,
    backend: str | None,
    memory: str,
    training: bool,
    fuse: bool = True,
    run: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    key=None,
    fallback: Callable[[Terms], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``sum_k weights[k] * op_k(x)`` of one edge (see ``edge_terms`` for the arguments).

    ``fallback(terms)`` sums terms the fused weighted sum cannot take (see
    ``summable``); without it they go to ``mixed_sum``, which says why not.
    """
    terms = edge_terms(
        x, weights, candidates, plan, cache, backend=backend, memory=memory, training=training, fuse=fuse, run=run,
        key=key,
    )  # fmt: skip
    lone_fused = not terms.outputs and len(terms.tensors) == 1
    if fallback is not None and not lone_fused and not summable(terms):
        return fallback(terms)
    return weighted_sum(terms, backend)


def partial_channel_sum(
    terms: Terms, bypass: torch.Tensor, groups: int, pool: bool, backend: str | None
) -> torch.Tensor:
    """PC-DARTS: ``channel_shuffle(cat([sum of terms, bypass]), groups)``, the bypass
    max-pooled 2x2 when ``pool``."""
    return partial_channel_mixed_sum(terms.tensors, terms.weights, bypass, groups, pool, backend=backend)


def hard_sample_sum(y: torch.Tensor, weights: torch.Tensor, index: int, form: str, backend: str | None) -> torch.Tensor:
    """A GDAS hard sample from ``y``, the output of candidate ``index``: in the "one"
    form ``weights[index] * y``, in the "sum" form plus the other weights (exactly 0
    in value, ``(0 - p) + p``: the gradient of every other hard weight is the sum of
    the output's gradient, as in AutoDL's ``forward_gdas``)."""
    out = mixed_sum([y], weights[index : index + 1], backend=backend)
    if form == "sum" and len(weights) > 1:
        rest = torch.cat([weights[:index], weights[index + 1 :]]).sum()
        out = out + rest.to(out.dtype)
    return out
