"""mixed_sum: the weighted sum of a DARTS mixed op, ``sum(weights[k] * xs[k])``.

Forward reads each input once and writes the output once. Backward reads the
output gradient once and writes the gradient of every input that needs one,
plus the weights' gradient by a fixed-order two-stage reduction (bit-identical
across runs). Inputs are never stacked into one K-times larger tensor.

Ops registered with torch.library:
  fastnas::mixed_sum / mixed_sum_backward               C++ (CPU and CUDA kernels)
  fastnas::mixed_sum_triton / mixed_sum_triton_backward  Triton kernels
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastnas import backends
from fastnas.ops._common import (
    MAX_INPUTS,
    check_device,
    check_devices,
    check_dtype,
    check_dtypes,
    check_grad_flags,
    check_same_shapes,
    check_tensor,
    check_tensor_list,
    check_value,
    fill_grads,
    grad_flags,
)
from fastnas.ops._registry import register_op


def mixed_sum_reference(xs: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """The oracle: eager PyTorch, one multiply and one add per candidate."""
    out = weights[0] * xs[0]
    for k in range(1, len(xs)):
        out = out + weights[k] * xs[k]
    return out


# --- argument checks ---------------------------------------------------------------


def check_weights(op: str, weights, k: int, device: torch.device) -> None:
    """``weights``: 1-D, one float per input, on the inputs' device."""
    check_tensor(op, "weights", weights)
    check_value(weights.dim() == 1, lambda: f"{op}: weights must be 1-D, got shape {tuple(weights.shape)}")
    check_value(weights.shape[0] == k, lambda: f"{op}: weights has {weights.shape[0]} entries but xs has {k} tensors")
    check_dtype(op, "weights", weights)
    check_device(op, "weights", weights, "xs are", device)


def check_mixed_sum(xs, weights, op: str = "mixed_sum") -> list[torch.Tensor]:
    """The arguments of ``mixed_sum`` (and the weighted sum of the ops built on it); returns xs as a list."""
    xs = check_tensor_list(op, "xs", xs)
    check_value(len(xs) > 0, lambda: f"{op}: xs is empty; it needs at least one tensor")
    check_value(
        len(xs) <= MAX_INPUTS, lambda: f"{op}: xs has {len(xs)} tensors; at most {MAX_INPUTS} are supported per call"
    )
    x0 = xs[0]
    check_dtype(op, "xs[0]", x0)
    check_same_shapes(op, "xs", xs)
    check_dtypes(op, "xs", xs, "xs[0]", x0.dtype)
    check_devices(op, "xs", xs, "xs[0] is", x0.device)
    check_weights(op, weights, len(xs), x0.device)
    return xs


def check_weighted_sum_backward(op: str, grad_out, xs, weights, xs_need_grad, weights_need_grad) -> list[torch.Tensor]:
    """What the backward ops of the weighted sums share: grad_out, the weights, one flag per input, and the
    inputs (all K when the weights need a gradient, else none or all), of grad_out's dtype and device."""
    check_tensor(op, "grad_out", grad_out)
    check_dtype(op, "grad_out", grad_out)
    xs = check_tensor_list(op, "xs", xs)
    check_tensor(op, "weights", weights)
    check_value(weights.dim() == 1, lambda: f"{op}: weights must be 1-D, got shape {tuple(weights.shape)}")
    k = weights.shape[0]
    check_value(1 <= k <= MAX_INPUTS, lambda: f"{op}: weights has {k} entries; 1 to {MAX_INPUTS} are supported")
    check_dtype(op, "weights", weights)
    check_device(op, "weights", weights, "grad_out is", grad_out.device)
    check_grad_flags(op, "xs_need_grad", xs_need_grad, k, "weights has")
    if weights_need_grad:
        check_value(len(xs) == k, lambda: f"{op}: weights_need_grad=True needs all {k} inputs xs, got {len(xs)}")
    else:
        check_value(len(xs) in (0, k), lambda: f"{op}: xs has {len(xs)} tensors; expected 0 or {k}")
    check_dtypes(op, "xs", xs, "grad_out", grad_out.dtype)
    check_devices(op, "xs", xs, "grad_out is", grad_out.device)
    return xs


def check_mixed_sum_backward(grad_out, xs, weights, xs_need_grad, weights_need_grad) -> None:
    op = "mixed_sum_backward"
    xs = check_weighted_sum_backward(op, grad_out, xs, weights, xs_need_grad, weights_need_grad)
    for i, x in enumerate(xs):
        check_value(
            x.shape == grad_out.shape,
            lambda: f"{op}: xs[{i}] has shape {tuple(x.shape)} but grad_out has shape {tuple(grad_out.shape)}",
        )


# --- the op ---------------------------------------------------------------------------


def mixed_sum(xs: Sequence[torch.Tensor], weights: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``sum(weights[k] * xs[k])`` over K tensors of one shape, dtype and device.

    ``weights`` is 1-D of length K and may have another floating dtype than xs
    (fp32 architecture weights with bf16 activations); the result has the dtype
    of ``xs`` and is accumulated in fp32 (fp64 for fp64 inputs).
    """
    xs = check_mixed_sum(xs, weights)
    name = backends.resolve("mixed_sum", xs[0].device, backend)
    if name == "reference":
        return mixed_sum_reference(xs, weights)
    if name == "triton":
        return torch.ops.fastnas.mixed_sum_triton(xs, weights)
    return torch.ops.fastnas.mixed_sum(xs, weights)


# --- autograd, shared by the C++ and the Triton op -------------------------------


def _setup_context(ctx, inputs, output):
    xs, weights = inputs
    ctx.xs_need = grad_flags(xs)
    ctx.w_need = bool(weights.requires_grad)
    # xs are read back only for the weights' gradient; keep them only then.
    ctx.save_for_backward(weights, *(xs if ctx.w_need else ()))


def _make_backward(backward_op):
    def backward(ctx, grad_out):
        weights, *xs = ctx.saved_tensors
        grad_xs, grad_w = backward_op(grad_out, xs, weights, ctx.xs_need, ctx.w_need)
        return fill_grads(ctx.xs_need, grad_xs), (grad_w if ctx.w_need else None)

    return backward


def _fake_forward(xs, weights):
    check_mixed_sum(xs, weights)
    return torch.empty_like(xs[0], memory_format=torch.contiguous_format)


def _fake_backward(grad_out, xs, weights, xs_need_grad, weights_need_grad):
    check_mixed_sum_backward(grad_out, xs, weights, xs_need_grad, weights_need_grad)
    grad_xs = [torch.empty_like(grad_out, memory_format=torch.contiguous_format) for need in xs_need_grad if need]
    grad_w = weights.new_empty((weights.shape[0] if weights_need_grad else 0,))
    return grad_xs, grad_w


# The Triton kernels take the K input pointers through a device-side table built
# from data_ptr(), which Inductor cannot trace; so these are opaque custom ops
# rather than torch.library.triton_op.
@torch.library.custom_op("fastnas::mixed_sum_triton", mutates_args=())
def _mixed_sum_triton(xs: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    from fastnas.kernels.mixed_sum import mixed_sum_forward

    return mixed_sum_forward([x.contiguous() for x in xs], weights.contiguous())


@torch.library.custom_op("fastnas::mixed_sum_triton_backward", mutates_args=())
def _mixed_sum_triton_backward(
    grad_out: torch.Tensor,
    xs: list[torch.Tensor],
    weights: torch.Tensor,
    xs_need_grad: list[bool],
    weights_need_grad: bool,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    from fastnas.kernels.mixed_sum import mixed_sum_backward

    return mixed_sum_backward(
        grad_out.contiguous(), [x.contiguous() for x in xs], weights.contiguous(), xs_need_grad, weights_need_grad
    )


register_op(
    "mixed_sum",
    _fake_forward,
    fake_backward=_fake_backward,
    setup_context=_setup_context,
    make_backward=_make_backward,
    triton=_mixed_sum_triton,
    triton_backward=_mixed_sum_triton_backward,
)
