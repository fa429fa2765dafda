"""partial_channel_node_sum: a whole PC-DARTS node in one pass.

``out = sum_e weights[e] * channel_shuffle(cat([mixed[e], P_e(bypass[e])], 1), groups)``

where ``mixed[e]`` (N, Cp, Ho, Wo) is edge e's mixed-op output on its sampled
channels, ``bypass[e]`` (N, Cb, H, W) the channels that skip the candidates
(typically the view ``h_e[:, Cp:]``, any strides), and P_e the identity on
stride-1 edges (H, W = Ho, Wo) or a 2x2 max pool on stride-2 edges (H, W =
2Ho, 2Wo). The edge outputs are never materialised: each output element is
read from its E sources and written once. Backward reads the output gradient
once; the weights' gradient is a fixed-order two-stage reduction, and the
pooling argmax is recomputed from the bypass (first maximum wins, as PyTorch).

Ops registered with torch.library:
  fastnas::partial_channel_node_sum / _backward                 C++ (CPU, CUDA)
  fastnas::partial_channel_node_sum_triton / _triton_backward   Triton
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastnas import backends
from fastnas.ops._common import (
    MAX_INPUTS,
    accumulate_dtype,
    check_device,
    check_devices,
    check_dtype,
    check_dtypes,
    check_grad_flags,
    check_groups,
    check_int_list,
    check_same_dtype,
    check_same_shapes,
    check_tensor,
    check_tensor_list,
    check_value,
    is_int,
)
from fastnas.ops._registry import register_op
from fastnas.ops.partial_channel_mixed_sum import channel_shuffle

_OP = "partial_channel_node_sum"


def partial_channel_node_sum_reference(
    mixed: Sequence[torch.Tensor],
    bypass: Sequence[torch.Tensor],
    weights: torch.Tensor,
    groups: int,
    strides: Sequence[int],
) -> torch.Tensor:
    """The oracle: each edge's pool, cat and shuffle, then the weighted sum, eagerly."""
    acc = accumulate_dtype(mixed[0].dtype)
    out = None
    for e, (m, b, s) in enumerate(zip(mixed, bypass, strides)):
        if s == 2:
            # max_pool2d rejects zero channels (K = 1 leaves no bypass).
            b = F.max_pool2d(b, 2, 2) if b.shape[1] else b[:, :, ::2, ::2]
        term = weights[e].to(acc) * channel_shuffle(torch.cat([m, b], dim=1), groups).to(acc)
        out = term if out is None else out + term
    return out.to(mixed[0].dtype)


def _check_nchw_list(op: str, name: str, ts) -> list[torch.Tensor]:
    ts = check_tensor_list(op, name, ts)

    def message():
        e = next(e for e, t in enumerate(ts) if t.dim() != 4)
        return f"{op}: {name}[{e}] must be a 4-D NCHW tensor, got shape {tuple(ts[e].shape)}"

    check_value(all(t.dim() == 4 for t in ts), message)
    return ts


def _check_node(op, mixed, bypass, weights, groups, strides):
    """What the forward and the backward op share; returns the arguments as lists."""
    mixed = _check_nchw_list(op, "mixed", mixed)
    bypass = _check_nchw_list(op, "bypass", bypass)
    num = len(mixed)
    check_value(num > 0, lambda: f"{op}: mixed is empty; a node needs at least one edge")
    check_value(num <= MAX_INPUTS, lambda: f"{op}: {num} edges; at most {MAX_INPUTS} are supported per call")
    check_value(len(bypass) == num, lambda: f"{op}: bypass has {len(bypass)} tensors but mixed has {num}")
    strides = check_int_list(op, "strides", strides)
    check_value(len(strides) == num, lambda: f"{op}: strides has {len(strides)} entries but mixed has {num} tensors")

    def stride_message():
        e = next(e for e, s in enumerate(strides) if not (is_int(s) and s in (1, 2)))
        return f"{op}: strides[{e}]={strides[e]!r}; each stride must be 1 or 2"

    check_value(all(is_int(s) and s in (1, 2) for s in strides), stride_message)
    m0 = mixed[0]
    check_dtype(op, "mixed[0]", m0)
    check_same_shapes(op, "mixed", mixed)
    check_dtypes(op, "mixed", mixed, "mixed[0]", m0.dtype)
    check_devices(op, "mixed", mixed, "mixed[0] is", m0.device)
    check_dtypes(op, "bypass", bypass, "mixed", m0.dtype)
    check_devices(op, "bypass", bypass, "mixed is", m0.device)
    n, cp, ho, wo = m0.shape
    cb = bypass[0].shape[1]

    def bypass_ok(b, s):
        return b.shape[0] == n and b.shape[1] == cb and b.shape[2] == ho * s and b.shape[3] == wo * s

    def bypass_message():
        e = next(e for e, (b, s) in enumerate(zip(bypass, strides)) if not bypass_ok(b, s))
        b, s = bypass[e], strides[e]
        if b.shape[0] != n:
            return f"{op}: bypass[{e}] has batch size {b.shape[0]} but mixed has {n}"
        if b.shape[1] != cb:
            return f"{op}: bypass[{e}] has {b.shape[1]} channels but bypass[0] has {cb}"
        return (
            f"{op}: bypass[{e}] is {b.shape[2]}x{b.shape[3]} but strides[{e}]={s} needs "
            f"{ho * s}x{wo * s} for mixed outputs of {ho}x{wo}"
        )

    check_value(all(bypass_ok(b, s) for b, s in zip(bypass, strides)), bypass_message)
    check_tensor(op, "weights", weights)
    check_value(
        weights.dim() == 1 and weights.shape[0] == num,
        lambda: f"{op}: weights must have shape ({num},), one per edge, got {tuple(weights.shape)}",
    )
    check_dtype(op, "weights", weights)
    check_device(op, "weights", weights, "mixed is", m0.device)
    check_groups(op, groups, cp + cb)
    return mixed, bypass, strides


def check_partial_channel_node_sum(mixed, bypass, weights, groups, strides):
    """The arguments of ``partial_channel_node_sum``; returns mixed, bypass and strides as lists."""
    return _check_node(_OP, mixed, bypass, weights, groups, strides)


def check_partial_channel_node_sum_backward(
    grad_out, mixed, bypass, weights, groups, strides, mixed_need_grad, bypass_need_grad, weights_need_grad
) -> None:
    op = f"{_OP}_backward"
    mixed, bypass, strides = _check_node(op, mixed, bypass, weights, groups, strides)
    n, cp, ho, wo = mixed[0].shape
    want = (n, cp + bypass[0].shape[1], ho, wo)
    check_tensor(op, "grad_out", grad_out)
    check_value(
        tuple(grad_out.shape) == want,
        lambda: f"{op}: grad_out has shape {tuple(grad_out.shape)}; expected {want}",
    )
    check_same_dtype(op, "grad_out", grad_out, "mixed", mixed[0].dtype)
    check_device(op, "grad_out", grad_out, "mixed is", mixed[0].device)
    check_grad_flags(op, "mixed_need_grad", mixed_need_grad, len(mixed), "mixed has")
    check_grad_flags(op, "bypass_need_grad", bypass_need_grad, len(mixed), "mixed has")


def partial_channel_node_sum(
    mixed: Sequence[torch.Tensor],
    bypass: Sequence[torch.Tensor],
    weights: torch.Tensor,
    groups: int,
    strides: Sequence[int],
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """PC-DARTS node: ``sum_e weights[e] * shuffle(cat([mixed[e], P_e(bypass[e])], 1), groups)``.

    ``mixed``: E tensors (N, Cp, Ho, Wo); ``bypass``: E tensors (N, Cb, H, W),
    any strides, with (H, W) = (Ho, Wo) where ``strides[e] == 1`` and (2Ho, 2Wo),
    max-pooled 2x2, where ``strides[e] == 2``; ``weights``: (E,), any float
    dtype, accumulated in fp32 (fp64 for fp64 inputs). Returns a contiguous
    (N, Cp + Cb, Ho, Wo) tensor in the dtype of ``mixed``.
    """
    mixed, bypass, strides = check_partial_channel_node_sum(mixed, bypass, weights, groups, strides)
    name = backends.resolve("partial_channel_node_sum", mixed[0].device, backend)
    if name == "reference":
        return partial_channel_node_sum_reference(mixed, bypass, weights, groups, strides)
    if name == "triton":
        return torch.ops.fastnas.partial_channel_node_sum_triton(mixed, bypass, weights, groups, strides)
    return torch.ops.fastnas.partial_channel_node_sum(mixed, bypass, weights, groups, strides)


# --- autograd, shared by the C++ and the Triton op -------------------------------


def _stand_in(like: torch.Tensor, shape) -> torch.Tensor:
    """A zero-stride tensor that only carries a shape: the kernels never read it."""
    return like.new_empty(()).expand(shape)


def _setup_context(ctx, inputs, output):
    mixed, bypass, weights, groups, strides = inputs
    ctx.groups, ctx.strides = groups, list(strides)
    ctx.mixed_need = [bool(m.requires_grad) for m in mixed]
    ctx.bypass_need = [bool(b.requires_grad) for b in bypass]
    ctx.w_need = bool(weights.requires_grad)
    ctx.mixed_shape = tuple(mixed[0].shape)
    ctx.bypass_shapes = [tuple(b.shape) for b in bypass]
    # The inputs are read back for the weights' gradient, and a stride-2
    # bypass for its pooling argmax; keep only those.
    keep_bypass = [ctx.w_need or (need and s == 2) for need, s in zip(ctx.bypass_need, strides)]
    ctx.kept_bypass = keep_bypass
    kept = [b for b, keep in zip(bypass, keep_bypass) if keep]
    ctx.num_mixed = len(mixed) if ctx.w_need else 0
    ctx.save_for_backward(weights, *(mixed if ctx.w_need else ()), *kept)


def _make_backward(backward_op):
    def backward(ctx, grad_out):
        weights, *saved = ctx.saved_tensors
        mixed = saved[: ctx.num_mixed]
        kept = iter(saved[ctx.num_mixed :])
        if not mixed:
            mixed = [_stand_in(grad_out, ctx.mixed_shape)] * len(ctx.strides)
        bypass = [
            next(kept) if keep else _stand_in(grad_out, shape)
            for keep, shape in zip(ctx.kept_bypass, ctx.bypass_shapes)
        ]
        grad_mixed, grad_bypass, grad_w = backward_op(
            grad_out, list(mixed), bypass, weights, ctx.groups, ctx.strides, ctx.mixed_need, ctx.bypass_need, ctx.w_need
        )
        it_m, it_b = iter(grad_mixed), iter(grad_bypass)
        return (
            [next(it_m) if need else None for need in ctx.mixed_need],
            [next(it_b) if need else None for need in ctx.bypass_need],
            grad_w if ctx.w_need else None,
            None,
            None,
        )

    return backward


def _fake_forward(mixed, bypass, weights, groups, strides):
    check_partial_channel_node_sum(mixed, bypass, weights, groups, strides)
    n, cp, ho, wo = mixed[0].shape
    return mixed[0].new_empty((n, cp + bypass[0].shape[1], ho, wo))


def _fake_backward(
    grad_out, mixed, bypass, weights, groups, strides, mixed_need_grad, bypass_need_grad, weights_need_grad
):
    check_partial_channel_node_sum_backward(
        grad_out, mixed, bypass, weights, groups, strides, mixed_need_grad, bypass_need_grad, weights_need_grad
    )
    grad_mixed = [grad_out.new_empty(tuple(m.shape)) for m, need in zip(mixed, mixed_need_grad) if need]
    grad_bypass = [grad_out.new_empty(tuple(b.shape)) for b, need in zip(bypass, bypass_need_grad) if need]
    grad_w = weights.new_empty((weights.shape[0] if weights_need_grad else 0,))
    return grad_mixed, grad_bypass, grad_w


# Opaque custom ops: the kernels take the inputs through a pointer table built
# from data_ptr(), which Inductor cannot trace.
@torch.library.custom_op("fastnas::partial_channel_node_sum_triton", mutates_args=())
def _node_triton(
    mixed: list[torch.Tensor], bypass: list[torch.Tensor], weights: torch.Tensor, groups: int, strides: list[int]
) -> torch.Tensor:
    from fastnas.kernels.partial_channel_node_sum import partial_channel_node_sum_forward

    return partial_channel_node_sum_forward(
        [m.contiguous() for m in mixed], list(bypass), weights.contiguous(), groups, list(strides)
    )


@torch.library.custom_op("fastnas::partial_channel_node_sum_triton_backward", mutates_args=())
def _node_triton_backward(
    grad_out: torch.Tensor,
    mixed: list[torch.Tensor],
    bypass: list[torch.Tensor],
    weights: torch.Tensor,
    groups: int,
    strides: list[int],
    mixed_need_grad: list[bool],
    bypass_need_grad: list[bool],
    weights_need_grad: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    from fastnas.kernels.partial_channel_node_sum import partial_channel_node_sum_backward

    return partial_channel_node_sum_backward(
        grad_out.contiguous(),
        # Stand-ins (zero strides) stay as they are: the kernel does not read them.
        [m.contiguous() if weights_need_grad else m for m in mixed],
        list(bypass),
        weights.contiguous(),
        groups,
        list(strides),
        list(mixed_need_grad),
        list(bypass_need_grad),
        weights_need_grad,
    )


register_op(
    "partial_channel_node_sum",
    _fake_forward,
    fake_backward=_fake_backward,
    setup_context=_setup_context,
    make_backward=_make_backward,
    triton=_node_triton,
    triton_backward=_node_triton_backward,
)
