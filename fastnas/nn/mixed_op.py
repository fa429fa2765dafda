"""Mixed operations: one supernet edge holding every candidate operation.

``MixedOp`` returns ``sum_k w_k * op_k(x)`` through the fused ``mixed_sum``;
``PartialChannelMixedOp`` (PC-DARTS) sends only the first C/K channels through
the candidates and the rest around them, through ``partial_channel_mixed_sum``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastnas.ops import mixed_sum, partial_channel_mixed_sum
from fastnas.nn.operations import OPS, Zero, check_primitives

MEMORY_MODES = ("save", "checkpoint")


def check_memory(memory: str) -> str:
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    return memory


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


class MixedOp(nn.Module):
    """Weighted sum of every candidate operation on one edge (DARTS).

    Args:
        C: channels in and out.
        stride: 1, or 2 on the edges of a reduction cell that leave its inputs.
        primitives: candidate names, keys of ``fastnas.nn.OPS``.
        affine: affine batch norm inside the candidates (False during search).
        pool_bn: follow pooling candidates with a non-affine batch norm, as DARTS
            does in search so their scale matches the convolutions'.
        backend: fastnas backend of the fused sum (None: the usual choice).
        memory: "save" keeps every candidate's output for backward; "checkpoint"
            recomputes them in backward (``torch.utils.checkpoint``).

    ``forward(x, weights, index=None)``: ``weights`` has one entry per candidate.
    With ``index`` only that candidate is run, scaled by ``weights[index]``
    (GDAS hard sampling). ``none`` candidates contribute exactly zero and are
    skipped in the sum; their weights still receive their (zero) gradient.
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
        self.ops = nn.ModuleList()
        for name in self.primitives:
            op = OPS[name](C, stride, affine)
            if pool_bn and "pool" in name:
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            self.ops.append(op)
        active = [k for k, op in enumerate(self.ops) if not isinstance(op, Zero)]
        # An edge of only `none` still needs an output of the right shape.
        self._active = active or [0]
        a = self._active
        self._active_slice = slice(a[0], a[-1] + 1) if a == list(range(a[0], a[-1] + 1)) else None
        # P-DARTS drops out the identity shortcut only, not the reducing one.
        self._dropped = {k for k, name in enumerate(self.primitives) if name == "skip_connect" and stride == 1}

    def _candidate(self, k: int, x: torch.Tensor) -> torch.Tensor:
        out = self.ops[k](x)
        if k in self._dropped and self.skip_drop_prob > 0 and self.training:
            out = F.dropout(out, p=self.skip_drop_prob)
        return out

    def _active_weights(self, weights: torch.Tensor) -> torch.Tensor:
        if self._active_slice is not None:
            return weights[self._active_slice]
        return weights[self._active]

    def _forward(self, x: torch.Tensor, weights: torch.Tensor, index: int | None) -> torch.Tensor:
        if index is not None:
            return mixed_sum([self._candidate(index, x)], weights[index : index + 1], backend=self.backend)
        outs = [self._candidate(k, x) for k in self._active]
        return mixed_sum(outs, self._active_weights(weights), backend=self.backend)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, index: int | None = None) -> torch.Tensor:
        if weights.dim() != 1 or weights.shape[0] != len(self.ops):
            raise ValueError(
                f"MixedOp: weights must have shape ({len(self.ops)},) for candidates {self.primitives}, "
                f"got {tuple(weights.shape)}"
            )
        if self.memory == "checkpoint" and torch.is_grad_enabled():
            return checkpoint(
                self._forward,
                x,
                weights,
                index,
                use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), _frozen_batch_norm_stats(self)),
            )
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

    def _forward(self, x: torch.Tensor, weights: torch.Tensor, index: int | None) -> torch.Tensor:
        cp = self.channels // self.groups
        part, bypass = x[:, :cp], x[:, cp:]
        if index is not None:
            outs, w = [self._candidate(index, part)], weights[index : index + 1]
        else:
            outs, w = [self._candidate(k, part) for k in self._active], self._active_weights(weights)
        return partial_channel_mixed_sum(outs, w, bypass, self.groups, self.stride == 2, backend=self.backend)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, " + super().extra_repr()
