"""Recognise a DARTS edge's candidate modules and run them through ``darts_edge``.

``edge_plan`` reads the structure of the candidates (leaf module types, shapes and
settings, not class names) and returns an ``EdgePlan`` that gathers, at each call,
the modules' current parameters and batch-norm buffers for
``fastnas.ops.darts_edge``, or a string saying why the edge cannot be fused. The
same recognition serves ``fastnas.nn.MixedOp`` and ``fastnas.patch``.

Fusable candidates, with C channels in and out:

- zero (``none``);
- identity (stride 1) and factorized reduce (stride 2: ReLU, two 1x1 stride-2
  convolutions to C/2 channels each, batch norm over C);
- ``MaxPool2d(3, stride, 1)`` and ``AvgPool2d(3, stride, 1, count_include_pad=False)``,
  each followed by a batch norm;
- separable convolutions (ReLU, depthwise kxk stride s, 1x1, BN, ReLU, depthwise kxk,
  1x1, BN) and dilated ones (ReLU, depthwise kxk dilation 2 stride s, 1x1, BN), k odd,
  "same" padding, no bias.

Every batch norm must be non-affine, track running statistics with a float momentum,
and share one eps and momentum within the edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from fastnas.ops.darts_edge import EdgeSpec

# Coarse kinds of candidate; "chain" is a ReLU/conv/BN sequence read from its leaves.
KINDS = ("zero", "identity", "max", "avg", "reduce", "chain")


@dataclass
class EdgePlan:
    spec: EdgeSpec
    params: list  # (module, attribute) per parameter, in EdgeSpec's order
    norms: list  # batch-norm modules, in EdgeSpec's buffer order

    def parameters(self) -> list[torch.Tensor]:
        return [getattr(m, name) for m, name in self.params]

    def buffers(self):
        return (
            [m.running_mean for m in self.norms],
            [m.running_var for m in self.norms],
            [m.num_batches_tracked for m in self.norms],
        )


def _leaves(m: nn.Module) -> list[nn.Module]:
    return [x for x in m.modules() if not any(True for _ in x.children())]


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _norm_ok(bn, C) -> str | None:
    if not isinstance(bn, nn.BatchNorm2d):
        return f"expected a BatchNorm2d, found {type(bn).__name__}"
    if bn.num_features != C:
        return f"a batch norm has {bn.num_features} features, the edge {C} channels"
    if bn.affine:
        return "a batch norm is affine (only non-affine batch norms are folded into the sum)"
    if not bn.track_running_stats or bn.running_mean is None:
        return "a batch norm does not track running statistics"
    if bn.momentum is None:
        return "a batch norm uses a cumulative average (momentum=None)"
    return None


def _depthwise(conv, C, stride, dilation) -> tuple[int, str | None]:
    if not isinstance(conv, nn.Conv2d):
        return 0, f"expected a Conv2d, found {type(conv).__name__}"
    k = _pair(conv.kernel_size)
    if (
        conv.in_channels != C
        or conv.out_channels != C
        or conv.groups != C
        or k[0] != k[1]
        or k[0] % 2 == 0
        or _pair(conv.stride) != (stride, stride)
        or _pair(conv.dilation) != (dilation, dilation)
        or _pair(conv.padding) != (dilation * (k[0] - 1) // 2,) * 2
        or conv.bias is not None
        or conv.padding_mode != "zeros"
    ):
        return 0, f"a depthwise convolution is not a fusable {C}-channel kxk (stride {stride}, dilation {dilation})"
    return k[0], None


def _pointwise(conv, C_in, C_out, stride=1) -> str | None:
    if (
        not isinstance(conv, nn.Conv2d)
        or conv.in_channels != C_in
        or conv.out_channels != C_out
        or conv.groups != 1
        or _pair(conv.kernel_size) != (1, 1)
        or _pair(conv.stride) != (stride, stride)
        or _pair(conv.padding) != (0, 0)
        or conv.bias is not None
    ):
        return "a 1x1 convolution does not map the edge's channels without bias"
    return None


def _chain(m: nn.Module, C: int, stride: int):
    """('sep'|'dil', k, [params], [norms]) or a reason string."""
    leaves = _leaves(m)
    kinds = [type(x) for x in leaves]
    block = [nn.ReLU, nn.Conv2d, nn.Conv2d, nn.BatchNorm2d]
    if kinds == block * 2:
        k1, why = _depthwise(leaves[1], C, stride, 1)
        k2, why2 = _depthwise(leaves[5], C, 1, 1)
        why = why or why2 or _pointwise(leaves[2], C, C) or _pointwise(leaves[6], C, C)
        why = why or _norm_ok(leaves[3], C) or _norm_ok(leaves[7], C)
        if why is None and k1 != k2:
            why = "the two depthwise convolutions of a separable convolution differ in size"
        if why:
            return why
        params = [(leaves[1], "weight"), (leaves[2], "weight"), (leaves[5], "weight"), (leaves[6], "weight")]
        return "sep", k1, params, [leaves[3], leaves[7]]
    if kinds == block:
        k, why = _depthwise(leaves[1], C, stride, 2)
        why = why or _pointwise(leaves[2], C, C) or _norm_ok(leaves[3], C)
        if why:
            return why
        return "dil", k, [(leaves[1], "weight"), (leaves[2], "weight")], [leaves[3]]
    return "a convolution candidate that is neither a separable nor a dilated (dilation 2) convolution"


def _pool(m: nn.Module, C: int, stride: int):
    """('max'|'avg', norm) or a reason string, for Sequential(pool, BatchNorm2d)."""
    leaves = _leaves(m)
    if len(leaves) != 2 or not isinstance(leaves[1], nn.BatchNorm2d):
        return "a pooling candidate without a following batch norm"
    pool = leaves[0]
    why = _norm_ok(leaves[1], C)
    if why:
        return why
    common = (
        _pair(pool.kernel_size) == (3, 3)
        and _pair(pool.stride) == (stride, stride)
        and _pair(pool.padding) == (1, 1)
        and not pool.ceil_mode
    )
    if isinstance(pool, nn.MaxPool2d) and common and _pair(pool.dilation) == (1, 1) and not pool.return_indices:
        return "max", leaves[1]
    if isinstance(pool, nn.AvgPool2d) and common and not pool.count_include_pad and pool.divisor_override is None:
        return "avg", leaves[1]
    return "a pooling candidate that is not a 3x3, padding 1 max pool or avg pool (count_include_pad=False)"


def _reduce(m: nn.Module, C: int):
    leaves = _leaves(m)
    convs = [x for x in leaves if isinstance(x, nn.Conv2d)]
    norms = [x for x in leaves if isinstance(x, nn.BatchNorm2d)]
    if len(convs) != 2 or len(norms) != 1 or len(leaves) != 4:
        return "a factorized reduce that is not ReLU, two 1x1 convolutions and a batch norm"
    half = C // 2
    why = _pointwise(convs[0], C, half, 2) or _pointwise(convs[1], C, C - half, 2) or _norm_ok(norms[0], C)
    if why:
        return why
    return [(convs[0], "weight"), (convs[1], "weight")], norms[0]


def edge_plan(candidates, kinds, C: int, stride: int) -> EdgePlan | str:
    """An ``EdgePlan`` for candidates of the given coarse ``kinds`` (see KINDS), or why not."""
    sep, dil = [], []
    max_index = avg_index = skip_index = reduce_index = None
    reduce_params, reduce_norm = [], None
    pool_norms = {}
    for i, (m, kind) in enumerate(zip(candidates, kinds)):
        if kind == "zero":
            continue
        if kind == "identity":
            if stride != 1 or skip_index is not None:
                return "an identity candidate on a stride-2 edge, or two identities"
            skip_index = i
        elif kind in ("max", "avg"):
            got = _pool(m, C, stride)
            if isinstance(got, str):
                return got
            if got[0] in pool_norms:
                return f"two {got[0]} pool candidates"
            pool_norms[got[0]] = got[1]
            if got[0] == "max":
                max_index = i
            else:
                avg_index = i
        elif kind == "reduce":
            if stride != 2 or reduce_index is not None:
                return "a factorized reduce on a stride-1 edge, or two of them"
            got = _reduce(m, C)
            if isinstance(got, str):
                return got
            reduce_index = i
            reduce_params, reduce_norm = got
        elif kind == "chain":
            got = _chain(m, C, stride)
            if isinstance(got, str):
                return got
            (sep if got[0] == "sep" else dil).append((got[1], i, got[2], got[3]))
        else:
            return f"candidate {i} ({type(m).__name__}) is not one the fused edge computes"
    if not (sep or dil or max_index is not None or avg_index is not None or skip_index is not None or reduce_norm):
        return "no candidate other than zero"
    norms = [s[3][0] for s in sep] + [d[3][0] for d in dil] + [s[3][1] for s in sep]
    norms += [reduce_norm] if reduce_norm is not None else []
    norms += [pool_norms[p] for p in ("max", "avg") if p in pool_norms]
    eps = {bn.eps for bn in norms}
    momentum = {float(bn.momentum) for bn in norms}
    if len(eps) > 1 or len(momentum) > 1:
        return "the batch norms of the edge differ in eps or momentum"
    spec = EdgeSpec(
        stride=stride,
        K=len(candidates),
        sep=tuple((k, i) for k, i, _, _ in sep),
        dil=tuple((k, i) for k, i, _, _ in dil),
        max_index=max_index,
        avg_index=avg_index,
        skip_index=skip_index,
        reduce_index=reduce_index,
        eps=eps.pop() if eps else 1e-5,
        momentum=momentum.pop() if momentum else 0.1,
    )
    params = [p for s in sep for p in s[2]] + [p for d in dil for p in d[2]] + reduce_params
    return EdgePlan(spec, params, norms)


def primitive_kinds(primitives, stride: int) -> list[str]:
    """Coarse kinds of fastnas's own primitives (names of ``fastnas.nn.OPS``)."""
    kinds = []
    for name in primitives:
        if name == "none":
            kinds.append("zero")
        elif name == "skip_connect":
            kinds.append("identity" if stride == 1 else "reduce")
        elif name == "max_pool_3x3":
            kinds.append("max")
        elif name == "avg_pool_3x3":
            kinds.append("avg")
        elif name.startswith(("sep_conv_", "dil_conv_")):
            kinds.append("chain")
        else:
            kinds.append("other")
    return kinds
