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
from fastnas.ops._common import check_inputs, fill_grads, grad_flags
from fastnas.ops.mixed_sum import mixed_sum_reference

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


def _check(xs, weights, bypass, groups, bypass_pool):
    xs = check_inputs(_OP, xs, weights)
    x0 = xs[0]
    if x0.dim() != 4:
        raise ValueError(f"{_OP}: xs must be 4-D NCHW tensors, got shape {tuple(x0.shape)}")
    if not isinstance(bypass, torch.Tensor):
        raise TypeError(f"{_OP}: bypass must be a tensor, got {type(bypass).__name__}")
    if bypass.dim() != 4:
        raise ValueError(f"{_OP}: bypass must be a 4-D NCHW tensor, got shape {tuple(bypass.shape)}")
    if bypass.dtype != x0.dtype:
        raise TypeError(f"{_OP}: bypass has dtype {bypass.dtype} but xs have dtype {x0.dtype}")
    if bypass.device != x0.device:
        raise ValueError(f"{_OP}: bypass is on {bypass.device} but xs are on {x0.device}")
    n, cp, h, w = x0.shape
    nb, cb, hb, wb = bypass.shape
    if nb != n:
        raise ValueError(f"{_OP}: bypass has batch size {nb} but xs have {n}")
    if bypass_pool:
        if hb % 2 or wb % 2:
            raise ValueError(f"{_OP}: bypass_pool=True needs an even bypass height and width, got {hb}x{wb}")
        if (hb // 2, wb // 2) != (h, w):
            raise ValueError(
                f"{_OP}: with bypass_pool=True the bypass must be twice the size of xs ({2 * h}x{2 * w}), got {hb}x{wb}"
            )
    elif (hb, wb) != (h, w):
        raise ValueError(f"{_OP}: bypass is {hb}x{wb} but xs are {h}x{w}")
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"{_OP}: groups must be an int, got {type(groups).__name__}")
    if groups < 1 or (cp + cb) % groups:
        raise ValueError(f"{_OP}: groups={groups} must be >= 1 and divide the {cp + cb} output channels")
    return xs


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
    xs = _check(xs, weights, bypass, groups, bypass_pool)
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
    n, cp, h, w = xs[0].shape
    return xs[0].new_empty((n, cp + bypass.shape[1], h, w))


def _fake_backward(
    grad_out, xs, weights, bypass, groups, bypass_pool, xs_need_grad, weights_need_grad, bypass_need_grad
):
    n, _, h, w = grad_out.shape
    cb = bypass.shape[1]
    cp = grad_out.shape[1] - cb
    grad_xs = [grad_out.new_empty((n, cp, h, w)) for need in xs_need_grad if need]
    grad_w = weights.new_empty((weights.shape[0] if weights_need_grad else 0,))
    grad_b = grad_out.new_empty(tuple(bypass.shape) if bypass_need_grad else (0,))
    return grad_xs, grad_w, grad_b


def _register_cpp():
    if not backends.register_cpp("partial_channel_mixed_sum", "partial_channel_mixed_sum_backward"):
        return
    torch.library.register_fake("fastnas::partial_channel_mixed_sum")(_fake_forward)
    torch.library.register_fake("fastnas::partial_channel_mixed_sum_backward")(_fake_backward)
    torch.library.register_autograd(
        "fastnas::partial_channel_mixed_sum",
        _make_backward(torch.ops.fastnas.partial_channel_mixed_sum_backward),
        setup_context=_setup_context,
    )


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


_pc_triton.register_fake(_fake_forward)
_pc_triton_backward.register_fake(_fake_backward)
_pc_triton.register_autograd(_make_backward(_pc_triton_backward), setup_context=_setup_context)
_register_cpp()
backends.register("partial_channel_mixed_sum", "triton")
