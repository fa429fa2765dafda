"""The DARTS search cell: two inputs, ``steps`` intermediate nodes, one mixed op per edge."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from fastnas import backends
from fastnas.nn.mixed_op import MixedOp, PartialChannelMixedOp, checkpoint_module
from fastnas.nn.operations import FactorizedReduce, ReLUConvBN
from fastnas.ops import mixed_sum
from fastnas.ops._common import STAT_DTYPES
from fastnas.ops.partial_channel_node import NodeSpec, partial_channel_node
from fastnas.ops.partial_channel_node_sum import partial_channel_node_sum
from fastnas.ops.relu_conv_bn import relu_conv_bn


def num_edges(steps: int) -> int:
    """Edges of a DARTS cell: node i (0-based) has 2 + i incoming edges."""
    return sum(2 + i for i in range(steps))


def edge_endpoints(steps: int) -> list[tuple[int, int]]:
    """(source state, target node) of every edge, in the order of the weight rows.

    States 0 and 1 are the cell inputs; state 2 + i is intermediate node i.
    """
    return [(j, i) for i in range(steps) for j in range(2 + i)]


def normalize_edge_weights(betas: torch.Tensor, steps: int) -> torch.Tensor:
    """Softmax of the edge betas over the incoming edges of each node (PC-DARTS)."""
    parts, start = [], 0
    for i in range(steps):
        end = start + 2 + i
        parts.append(torch.softmax(betas[start:end], dim=-1))
        start = end
    return torch.cat(parts)


def _preprocess_parts(module: nn.Module) -> tuple[list[torch.Tensor], nn.BatchNorm2d] | None:
    """The convolution weights and the batch norm of a cell's input preprocessing, when
    ``fastnas.ops.relu_conv_bn`` computes it (a ReLU, 1x1 convolutions, a non-affine batch
    norm with running statistics and a momentum, in training mode), else None."""
    if isinstance(module, ReLUConvBN):
        relu, conv, bn = module.op
        convs, stride = [conv], 1
    elif isinstance(module, FactorizedReduce):
        relu, convs, bn, stride = module.relu, [module.conv_1, module.conv_2], module.bn, 2
    else:
        return None
    plain = all(
        c.kernel_size == (1, 1) and c.stride == (stride, stride) and c.padding == (0, 0) and c.dilation == (1, 1)
        and c.groups == 1 and c.bias is None
        for c in convs
    )  # fmt: skip
    norm = isinstance(bn, nn.BatchNorm2d) and not bn.affine and bn.training and bn.momentum is not None
    stats = bn.track_running_stats and bn.running_mean is not None and bn.running_mean.dtype in STAT_DTYPES
    if not (type(relu) is nn.ReLU and plain and norm and stats):
        return None
    return [c.weight for c in convs], bn


class Cell(nn.Module):
    """A DARTS search cell.

    Args:
        steps: intermediate nodes (4 in DARTS, giving 14 edges).
        multiplier: how many of the last nodes are concatenated as the output.
        C_prev_prev, C_prev: channels of the two cell inputs.
        C: channels of every node.
        reduction: this cell halves the resolution (stride 2 on edges from inputs).
        reduction_prev: the previous cell did, so input 0 is reduced to match.
        edge_primitives: one candidate list per edge, all the same length.
        partial_channels: K of PC-DARTS, or None for full mixed ops.
        backend, memory, affine: passed to the mixed ops. Under ``memory="recompute"``, and
            under ``"save"`` when the edges run the fused engine, the two input
            preprocessings (ReLU, 1x1 convolution, batch norm) keep only their
            input, the previous cells' outputs, and run again in backward.

    ``forward(s0, s1, weights, edge_weights=None, indices=None)``: ``weights`` is
    (edges, candidates); ``edge_weights`` (edges,) scales each edge's output
    before the node sum (edge normalisation); ``indices`` (one int per edge)
    runs only that candidate of each edge.
    """

    def __init__(
        self,
        steps: int,
        multiplier: int,
        C_prev_prev: int,
        C_prev: int,
        C: int,
        reduction: bool,
        reduction_prev: bool,
        edge_primitives: Sequence[Sequence[str]],
        partial_channels: int | None = None,
        backend: str | None = None,
        memory: str = "save",
        affine: bool = False,
    ):
        super().__init__()
        if len(edge_primitives) != num_edges(steps):
            raise ValueError(f"a cell of {steps} steps has {num_edges(steps)} edges, got {len(edge_primitives)} lists")
        self.steps = steps
        self.multiplier = multiplier
        self.reduction = reduction
        self.backend = backend
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self.partial_channels = partial_channels
        self.edges = nn.ModuleList()
        for (j, _), names in zip(edge_endpoints(steps), edge_primitives):
            stride = 2 if reduction and j < 2 else 1
            if partial_channels is None:
                op = MixedOp(C, stride, names, affine=affine, backend=backend, memory=memory)
            else:
                op = PartialChannelMixedOp(
                    C, stride, names, partial_channels, affine=affine, backend=backend, memory=memory
                )
            self.edges.append(op)
        # PC-DARTS: each node's static structure for the one-call node op, when every
        # incoming edge is fusable (None otherwise).
        self._node_specs: list[NodeSpec | None] = []
        if partial_channels is not None:
            offset = 0
            for i in range(steps):
                specs = [e.plan.spec for e in self.edges[offset : offset + 2 + i]]
                fusable = all(s is not None for s in specs) and len({s.K for s in specs}) == 1
                self._node_specs.append(NodeSpec(tuple(specs), partial_channels) if fusable else None)
                offset += 2 + i

    def forward(
        self,
        s0: torch.Tensor,
        s1: torch.Tensor,
        weights: torch.Tensor,
        edge_weights: torch.Tensor | None = None,
        indices: Sequence[int] | None = None,
    ) -> torch.Tensor:
        states = [self._preprocess(self.preprocess0, s0), self._preprocess(self.preprocess1, s1)]
        offset = 0
        for _ in range(self.steps):
            n = len(states)
            if self.partial_channels is not None:
                states.append(self._partial_channel_node(states, weights, edge_weights, indices, offset))
                offset += n
                continue
            outs = [
                self.edges[offset + j](h, weights[offset + j], None if indices is None else indices[offset + j])
                for j, h in enumerate(states)
            ]
            if edge_weights is None:
                node = outs[0]
                for out in outs[1:]:
                    node = node + out
            else:
                node = mixed_sum(outs, edge_weights[offset : offset + n], backend=self.backend)
            states.append(node)
            offset += n
        return torch.cat(states[-self.multiplier :], dim=1)

    def _preprocess(self, module: nn.Module, s: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled() and self.edges and self._recompute_preprocess(s)):
            return module(s)
        eager = backends.requested_backend(self.backend) == "reference" or torch.compiler.is_compiling()
        parts = None if eager else _preprocess_parts(module)
        if parts is not None and s.device.type in backends.runnable("relu_conv_bn", s.device):
            weights, bn = parts
            return relu_conv_bn(
                s, weights, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.eps, bn.momentum,
                backend=s.device.type,
            )  # fmt: skip
        # No randomness inside.
        return checkpoint_module(module, module, s, preserve_rng_state=False)

    def _recompute_preprocess(self, s: torch.Tensor) -> bool:
        """Recompute the preprocessing in backward: always under recompute, and
        under save when the edges run the fused engine (eager modules keep theirs)."""
        memory = self.edges[0].memory
        if memory == "recompute":
            return True
        return memory == "save" and any(
            e.plan.fused_reason(s, e.backend, training=True, memory=memory) is None for e in self.edges
        )

    def _partial_channel_node(self, states, weights, edge_weights, indices, offset) -> torch.Tensor:
        """A PC-DARTS node in one pass: every edge's mixed part, bypass, shuffle and weight."""
        edges = [self.edges[offset + j] for j in range(len(states))]
        fused = self._fused_node(edges, states, weights, edge_weights, indices, offset)
        if fused is not None:
            return fused
        mixed = [
            e.mixed(h, weights[offset + j], None if indices is None else indices[offset + j])
            for j, (e, h) in enumerate(zip(edges, states))
        ]
        bypass = [e.split(h)[1] for e, h in zip(edges, states)]
        if edge_weights is None:
            beta = weights.new_ones(len(states))
        else:
            beta = edge_weights[offset : offset + len(states)]
        return partial_channel_node_sum(
            mixed, bypass, beta, self.partial_channels, [e.stride for e in edges], backend=self.backend
        )

    def _fused_node(self, edges, states, weights, edge_weights, indices, offset) -> torch.Tensor | None:
        """The node as one fastnas.ops.partial_channel_node call when every edge runs fused, else None."""
        spec = self._node_specs[len(states) - 2]
        if spec is None or indices is not None or len({(e.memory, e.backend) for e in edges}) != 1:
            return None
        for e, h in zip(edges, states):
            # An edge with P-DARTS skip dropout adds its identity term outside the fused edge.
            if not e._fusable(h, None) or (e._spec_no_skip is not None and e.skip_drop_prob > 0):
                return None
        n = len(states)
        beta = weights.new_ones(n) if edge_weights is None else edge_weights[offset : offset + n]
        bound = [e._bound_edge() for e in edges]
        params, buffers = [b.parameters() for b in bound], [b.buffers() for b in bound]
        return partial_channel_node(
            states, weights[offset : offset + n], beta, params, spec, buffers, memory=edges[0].memory,
            backend=edges[0].backend,
        )  # fmt: skip
