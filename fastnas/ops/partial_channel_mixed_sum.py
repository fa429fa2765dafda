"""partial_channel_mixed_sum: the PC-DARTS edge in one pass.

``channel_shuffle(cat([mixed_sum(xs, weights), bypass], 1), groups)``, where the
bypass (the channels that skip the candidates) is first max-pooled 2x2 on
reduction edges (``bypass_pool=True``). The fused kernels write each element
straight to its shuffled position; backward reads the output gradient once and
recomputes the pooling argmax from the bypass instead of storing indices.

Ops registered with torch.library:
  fastnas::partial_channel_mixed_sum / _backward                C++ (CPU, CUDA)
  fastnas::partial_channel_mixed_sum_triton / _triton_backward  Triton
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastnas import backends
from fastnas.ops._common import (
    check_device,
    check_groups,
    check_same_dtype,
    check_tensor,
    check_value,
    fill_grads,
    grad_flags,
)
from fastnas.ops._registry import register_op
from fastnas.ops.mixed_sum import check_mixed_sum, check_weighted_sum_backward, mixed_sum_reference

_OP = "partial_channel_mixed_sum"


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle: view as (N, g, C/g, H, W), swap dims 1 and 2."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def partial_channel_mixed_sum_reference(
    xs: Sequence[torch.Tensor],
    weights: torch.Tensor,
    bypass: torch.Tensor,
    groups: int,
    bypass_pool: bool = False,
) -> torch.Tensor:
    """The oracle: eager PyTorch sum, pool, cat and shuffle."""
    mixed = mixed_sum_reference(xs, weights)
    if bypass_pool:
        bypass = F.max_pool2d(bypass, 2, 2)
    return channel_shuffle(torch.cat([mixed, bypass], dim=1), groups)


def _check_bypass_size(op: str, bypass: torch.Tensor, h: int, w: int, bypass_pool: bool) -> None:
    hb, wb = bypass.shape[2], bypass.shape[3]
    if bypass_pool:
        check_value(
            hb % 2 == 0 and wb % 2 == 0,
            lambda: f"{op}: bypass_pool=True needs an even bypass height and width, got {hb}x{wb}",
        )
        check_value(
            hb == 2 * h and wb == 2 * w,
            lambda: (
                f"{op}: with bypass_pool=True the bypass must be twice the size of xs ({2 * h}x{2 * w}), got {hb}x{wb}"
            ),
        )
    else:
        check_value(hb == h and wb == w, lambda: f"{op}: bypass is {hb}x{wb} but xs are {h}x{w}")


def check_partial_channel_mixed_sum(xs, weights, bypass, groups, bypass_pool) -> list[torch.Tensor]:
    """The arguments of ``partial_channel_mixed_sum``; returns xs as a list."""
    op = _OP
    xs = check_mixed_sum(xs, weights, op)
    x0 = xs[0]
    check_value(x0.dim() == 4, lambda: f"{op}: xs must be 4-D NCHW tensors, got shape {tuple(x0.shape)}")
    check_tensor(op, "bypass", bypass)
    check_value(bypass.dim() == 4, lambda: f"{op}: bypass must be a 4-D NCHW tensor, got shape {tuple(bypass.shape)}")
    check_same_dtype(op, "bypass", bypass, "xs", x0.dtype)
    check_device(op, "bypass", bypass, "xs are", x0.device)
    n, cp, h, w = x0.shape
    check_value(bypass.shape[0] == n, lambda: f"{op}: bypass has batch size {bypass.shape[0]} but xs have {n}")
    _check_bypass_size(op, bypass, h, w, bypass_pool)
    check_groups(op, groups, cp + bypass.shape[1])
    return xs


def check_partial_channel_mixed_sum_backward(
    grad_out, xs, weights, bypass, groups, bypass_pool, xs_need_grad, weights_need_grad, bypass_need_grad
) -> None:
    op = f"{_OP}_backward"
    xs = check_weighted_sum_backward(op, grad_out, xs, weights, xs_need_grad, weights_need_grad)
    check_value(grad_out.dim() == 4, lambda: f"{op}: grad_out must be 4-D NCHW, got shape {tuple(grad_out.shape)}")
    check_tensor(op, "bypass", bypass)
    check_value(bypass.dim() == 4, lambda: f"{op}: bypass must be a 4-D NCHW tensor, got shape {tuple(bypass.shape)}")
    n, c, h, w = grad_out.shape
    cb = bypass.shape[1]
    check_value(c >= cb, lambda: f"{op}: grad_out has {c} channels, fewer than the bypass's {cb}")
    check_value(bypass.shape[0] == n, lambda: f"{op}: bypass has batch size {bypass.shape[0]} but xs have {n}")
    _check_bypass_size(op, bypass, h, w, bypass_pool)
    check_groups(op, groups, c)
    x_shape = (n, c - cb, h, w)
    for i, x in enumerate(xs):
        check_value(
            tuple(x.shape) == x_shape,
            lambda: f"{op}: xs[{i}] has shape {tuple(x.shape)} but grad_out implies {x_shape}",
        )
    if bypass_need_grad:
        check_same_dtype(op, "bypass", bypass, "grad_out", grad_out.dtype)
        check_device(op, "bypass", bypass, "grad_out is", grad_out.device)


def partial_channel_mixed_sum(
    xs: Sequence[torch.Tensor],
    weights: torch.Tensor,
    bypass: torch.Tensor,
    groups: int,
    bypass_pool: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """PC-DARTS edge output: shuffle(cat([sum_k weights[k] * xs[k], pool?(bypass)]), groups).

    ``xs``: K tensors (N, Cp, H, W), the candidates' outputs on the sampled
    channels; ``bypass``: (N, Cb, H, W), or (N, Cb, 2H, 2W) with ``bypass_pool``.
    Returns (N, Cp + Cb, H, W) in the dtype of ``xs``.
    """
    xs = check_partial_channel_mixed_sum(xs, weights, bypass, groups, bypass_pool)
    name = backends.resolve("partial_channel_mixed_sum", xs[0].device, backend)
    if name == "reference":
        return partial_channel_mixed_sum_reference(xs, weights, bypass, groups, bypass_pool)
    if name == "triton":
        return torch.ops.fastnas.partial_channel_mixed_sum_triton(xs, weights, bypass, groups, bypass_pool)
    return torch.ops.fastnas.partial_channel_mixed_sum(xs, weights, bypass, groups, bypass_pool)


# --- autograd, shared by the C++ and the Triton op -------------------------------


def _setup_context(ctx, inputs, output):
    xs, weights, bypass, groups, bypass_pool = inputs
    ctx.groups, ctx.bypass_pool = groups, bypass_pool
    ctx.xs_need = grad_flags(xs)
    ctx.w_need = bool(weights.requires_grad)
    ctx.b_need = bool(bypass.requires_grad)
    ctx.bypass_shape = bypass.shape
    # The bypass is read back only to find the pooling argmax.
    keep_bypass = ctx.b_need and bypass_pool
    ctx.save_for_backward(weights, bypass if keep_bypass else None, *(xs if ctx.w_need else ()))


def _make_backward(backward_op):
    def backward(ctx, grad_out):
        weights, bypass, *xs = ctx.saved_tensors
        if bypass is None:
            # Only its shape matters to the kernel then; a zero-stride stand-in.
            bypass = grad_out.new_empty(()).expand(ctx.bypass_shape)
        grad_xs, grad_w, grad_b = backward_op(
            grad_out, xs, weights, bypass, ctx.groups, ctx.bypass_pool, ctx.xs_need, ctx.w_need, ctx.b_need
        )
        return (
            fill_grads(ctx.xs_need, grad_xs),
            grad_w if ctx.w_need else None,
            grad_b if ctx.b_need else None,
            None,
            None,
        )

    return backward


def _fake_forward(xs, weights, bypass, groups, bypass_pool):
    check_partial_channel_mixed_sum(xs, weights, bypass, groups, bypass_pool)
    n, cp, h, w = xs[0].shape
    return xs[0].new_empty((n, cp + bypass.shape[1], h, w))


def _fake_backward(
    grad_out, xs, weights, bypass, groups, bypass_pool, xs_need_grad, weights_need_grad, bypass_need_grad
):
    check_partial_channel_mixed_sum_backward(
        grad_out, xs, weights, bypass, groups, bypass_pool, xs_need_grad, weights_need_grad, bypass_need_grad
    )
    n, _, h, w = grad_out.shape
    cb = bypass.shape[1]
    cp = grad_out.shape[1] - cb
    grad_xs = [grad_out.new_empty((n, cp, h, w)) for need in xs_need_grad if need]
    grad_w = weights.new_empty((weights.shape[0] if weights_need_grad else 0,))
    grad_b = grad_out.new_empty(tuple(bypass.shape) if bypass_need_grad else (0,))
    return grad_xs, grad_w, grad_b


# Opaque custom ops, for the reason given in mixed_sum.py.
@torch.library.custom_op("fastnas::partial_channel_mixed_sum_triton", mutates_args=())
def _pc_triton(
    xs: list[torch.Tensor], weights: torch.Tensor, bypass: torch.Tensor, groups: int, bypass_pool: bool
) -> torch.Tensor:
    from fastnas.kernels.partial_channel_mixed_sum import partial_channel_mixed_sum_forward

    return partial_channel_mixed_sum_forward(
        [x.contiguous() for x in xs], weights.contiguous(), bypass.contiguous(), groups, bypass_pool
    )


@torch.library.custom_op("fastnas::partial_channel_mixed_sum_triton_backward", mutates_args=())
def _pc_triton_backward(
    grad_out: torch.Tensor,
    xs: list[torch.Tensor],
    weights: torch.Tensor,
    bypass: torch.Tensor,
    groups: int,
    bypass_pool: bool,
    xs_need_grad: list[bool],
    weights_need_grad: bool,
    bypass_need_grad: bool,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    from fastnas.kernels.partial_channel_mixed_sum import partial_channel_mixed_sum_backward

    return partial_channel_mixed_sum_backward(
        grad_out.contiguous(),
        [x.contiguous() for x in xs],
        weights.contiguous(),
        bypass,
        groups,
        bypass_pool,
        xs_need_grad,
        weights_need_grad,
        bypass_need_grad,
    )


register_op(
    _OP,
    _fake_forward,
    fake_backward=_fake_backward,
    setup_context=_setup_context,
    make_backward=_make_backward,
    triton=_pc_triton,
    triton_backward=_pc_triton_backward,
)
