"""partial_channel_node: a whole PC-DARTS node, its edges' candidates included.

``out = sum_e edge_weights[e] * shuffle(cat([darts_edge(h_e[:, :C/g], weights[e]), P_e(h_e[:, C/g:])]), g)``

Every incoming edge e runs its fused DARTS candidates (``fastnas.ops.darts_edge``)
on the first C / groups channels of its state ``h_e``; the remaining channels bypass
them (max-pooled 2x2 on stride-2 edges), and ``partial_channel_node_sum`` writes the
shuffled, edge-weighted sum once. Batch-norm running statistics are updated in
forward; ``memory`` says what each edge keeps for backward, as for ``darts_edge``.

The eager oracle is the modules' path: one ``darts_edge`` per edge, then
``partial_channel_node_sum`` (the composite below, which the ``triton`` and
``reference`` backends run). The composite must stay beside the C++ op: that op
reaches its building blocks through the dispatcher, which holds only their C++
kernels, while the Triton kernels exist only as Python custom ops and the reference
only as eager PyTorch. tests/test_partial_channel_node.py keeps the two identical:
the composite on the ``cpu`` building blocks against the C++ op, bit for bit.

Ops registered with torch.library:
  fastnas::partial_channel_node / _backward   C++ (csrc/partial_channel_node.cpp), one call per direction
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastnas import backends
from fastnas.ops._registry import register_op
from fastnas.ops.darts_edge import MEMORY_MODES, EdgeSpec, darts_edge
from fastnas.ops.darts_edge import _check as _check_edge
from fastnas.ops.partial_channel_node_sum import partial_channel_node_sum

_OP = "partial_channel_node"


@dataclass(frozen=True)
class NodeSpec:
    """The static structure of a PC-DARTS node: its incoming edges' ``EdgeSpec`` and ``groups``
    (K of PC-DARTS: 1 / groups of the channels go through the candidates)."""

    edges: tuple[EdgeSpec, ...]
    groups: int

    def __post_init__(self):
        if not self.edges:
            raise ValueError("NodeSpec: a node needs at least one edge")
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"NodeSpec: groups must be a positive int, got {self.groups!r}")
        if len({e.K for e in self.edges}) != 1:
            raise ValueError(f"NodeSpec: every edge needs the same number of weights, got {[e.K for e in self.edges]}")
        # What the C++ op reads, computed once.
        object.__setattr__(self, "_encoded", tuple(v for e in self.edges for v in e.encoded))
        object.__setattr__(self, "_eps", tuple(e.eps for e in self.edges))
        object.__setattr__(self, "_momentum", tuple(e.momentum for e in self.edges))
        object.__setattr__(self, "_strides", tuple(e.stride for e in self.edges))

    @property
    def encoded(self) -> tuple[int, ...]:
        """The edges' ``EdgeSpec.encoded``, one after the other."""
        return self._encoded

    @classmethod
    def decode(cls, encoded, eps, momentum, groups: int) -> NodeSpec:
        encoded, edges, at = [int(v) for v in encoded], [], 0
        for e in range(len(eps)):
            if len(encoded) < at + 8:
                raise ValueError(f"NodeSpec.decode: {len(encoded)} ints end inside edge {e}'s header")
            size = EdgeSpec.encoded_size(encoded[at + 2], encoded[at + 3])
            edges.append(EdgeSpec.decode(encoded[at : at + size], eps[e], momentum[e]))
            at += size
        if at != len(encoded):
            raise ValueError(f"NodeSpec.decode: {len(encoded)} ints; the {len(eps)} edges describe {at}")
        return cls(tuple(edges), int(groups))


def _check(op: str, states, weights, edge_weights, params, spec: NodeSpec, buffers, memory: str) -> None:
    """The node's arguments, as the C++ op checks them (csrc/partial_channel_node.cpp)."""
    E = len(spec.edges)
    torch._check_value(len(states) == E, lambda: f"{op}: {len(states)} states for a node of {E} edges")
    torch._check_value(len(params) == E, lambda: f"{op}: params needs one list per edge ({E}), got {len(params)}")
    torch._check_value(
        states[0].dim() == 4 and states[0].shape[1] % spec.groups == 0,
        lambda: (
            f"{op}: states must be (N, C, H, W) with C divisible by groups={spec.groups}, got {tuple(states[0].shape)}"
        ),
    )
    K = spec.edges[0].K
    torch._check_value(
        weights.dim() == 2 and tuple(weights.shape) == (E, K),
        lambda: f"{op}: weights must have shape (edges, candidates) = ({E}, {K}), got {tuple(weights.shape)}",
    )
    torch._check_value(
        edge_weights.dim() == 1 and edge_weights.shape[0] == E,
        lambda: f"{op}: edge_weights must have shape ({E},), one per edge, got {tuple(edge_weights.shape)}",
    )
    torch._check_value(buffers is None or len(buffers) == E, lambda: f"{op}: buffers needs one triple per edge ({E})")
    cp = states[0].shape[1] // spec.groups
    for e, (h, es) in enumerate(zip(states, spec.edges)):
        torch._check_value(
            h.dim() == 4 and h.shape[:2] == states[0].shape[:2],
            lambda e=e, h=h: (
                f"{op}: states[{e}] has shape {tuple(h.shape)}; expected (N, C) = {tuple(states[0].shape[:2])}"
            ),
        )
        _check_edge(f"{op} (edge {e})", h[:, :cp], weights[e], list(params[e]), es,
                    None if buffers is None else buffers[e], memory)  # fmt: skip


def partial_channel_node(
    states: Sequence[torch.Tensor],
    weights: torch.Tensor,
    edge_weights: torch.Tensor,
    params: Sequence[Sequence[torch.Tensor]],
    spec: NodeSpec,
    buffers=None,
    *,
    memory: str = "save",
    backend: str | None = None,
) -> torch.Tensor:
    """A PC-DARTS node (see the module docstring), in training mode.

    ``states``: the E incoming states (N, C, H_e, W_e); ``weights``: (E, K), each
    edge's candidate weights; ``edge_weights``: (E,) (ones without edge
    normalisation); ``params``: one list per edge, in ``EdgeSpec`` order;
    ``buffers``: None, or one (running means, running variances, counts) triple per
    edge, updated in place. Where the C++ op has a kernel for the backend this is
    one call forward and one backward.
    """
    name = backends.resolve(_OP, states[0].device, backend)
    if name in _CPP_BACKENDS:
        flat = [p for ps in params for p in ps]
        if buffers is None:
            means = variances = counts = ()
        else:
            means = [t for b in buffers for t in b[0]]
            variances = [t for b in buffers for t in b[1]]
            counts = [t for b in buffers for t in b[2]]
        return torch.ops.fastnas.partial_channel_node(
            states, weights, edge_weights, flat, means, variances, counts, spec.encoded, spec._eps, spec._momentum,
            spec.groups, memory,
        )[0]  # fmt: skip
    _check(_OP, states, weights, edge_weights, params, spec, buffers, memory)
    cp = states[0].shape[1] // spec.groups
    mixed = [
        darts_edge(
            h[:, :cp],
            weights[e],
            params[e],
            es,
            None if buffers is None else buffers[e],
            memory=memory,
            backend=backend,
        )  # fmt: skip
        for e, (h, es) in enumerate(zip(states, spec.edges))
    ]
    bypass = [h[:, cp:] for h in states]
    return partial_channel_node_sum(mixed, bypass, edge_weights, spec.groups, list(spec._strides), backend=backend)


# --- the C++ op: fake implementations ------------------------------------------------------


def _split(flat, sizes):
    out, at = [], 0
    for n in sizes:
        out.append(list(flat[at : at + n]))
        at += n
    return out


def _fake_forward(
    states, weights, edge_weights, params, running_mean, running_var, num_batches_tracked, specs, eps, momentum,
    groups, memory,
):  # fmt: skip
    spec = NodeSpec.decode(specs, eps, momentum, groups)
    torch._check_value(memory in MEMORY_MODES, lambda: f"{_OP}: memory must be one of {MEMORY_MODES}, got {memory!r}")
    per_edge = _split(params, [e.n_params for e in spec.edges])
    buffers = None
    if running_mean or running_var:
        norms = [e.n_norms for e in spec.edges]
        buffers = list(zip(*(_split(b, norms) for b in (running_mean, running_var, num_batches_tracked))))
    _check(_OP, states, weights, edge_weights, per_edge, spec, buffers, memory)
    N, C = states[0].shape[:2]
    cp = C // groups
    acc = torch.float64 if states[0].dtype == torch.float64 else torch.float32
    e0, h0 = spec.edges[0], states[0]
    Ho, Wo = (h0.shape[2] - 1) // e0.stride + 1, (h0.shape[3] - 1) // e0.stride + 1
    nz, ns = sum(e.nz for e in spec.edges), sum(e.ns for e in spec.edges)
    stats = nz + 2 * len(spec.edges)
    return (
        h0.new_empty((N, C, Ho, Wo)),
        h0.new_empty((len(states), N, cp, Ho, Wo)),
        h0.new_empty((nz, cp, N, Ho, Wo)),
        h0.new_empty((ns, cp), dtype=acc),
        h0.new_empty((ns, cp), dtype=acc),
        h0.new_empty((stats, cp), dtype=acc),
        h0.new_empty((stats, cp), dtype=acc),
    )


def _fake_backward(
    grad_out, states, weights, edge_weights, params, mixed, zs, mid_mean, mid_rstd, mean, rstd, specs, groups
):
    E = len(states)
    spec = NodeSpec.decode(specs, [0.0] * E, [0.0] * E, groups)
    _check(_OP + "_backward", states, weights, edge_weights, _split(params, [e.n_params for e in spec.edges]), spec,
           None, "save")  # fmt: skip
    return (
        [h.new_empty(h.shape) for h in states],
        weights.new_empty(weights.shape),
        edge_weights.new_empty(edge_weights.shape),
        [p.new_empty(p.shape) for p in params],
    )


# The C++ op has its own autograd; the composite (one darts_edge per edge, then
# partial_channel_node_sum) runs elsewhere.
_CPP_BACKENDS = register_op(_OP, _fake_forward, fake_backward=_fake_backward, python=("cpu", "cuda", "triton"))

__all__ = ["NodeSpec", "partial_channel_node"]
