"""multi_depthwise: J depthwise convolutions of one activated input, stacked channel-major.

The DARTS candidates sep_conv_3x3/5x5 and dil_conv_3x3/5x5 all begin with
ReLU of the same edge input followed by a depthwise convolution. This op reads
the input once, applies the ReLU (optionally after a batch norm without
affine, ``(x - mean) * rstd``) in registers and writes the J depthwise outputs
into one (J, C, N, Ho, Wo) buffer, so the J pointwise convolutions that follow
are one bmm over (C, N*Ho*Wo) matrices. ``activations`` puts another
activation of ``fastnas.ops.activations`` in place of the ReLU, one for all
candidates or one per candidate: candidates of several activations still read
the input once (Scalable-DARTS' activation x convolution pairs).

Inputs:
  x          (N, C, H, W), shared by all J candidates, or (J, C, N, H, W), one
             input per candidate (then ``mean``/``rstd`` may be given, (J, C) fp32).
  weights    J tensors (C, 1, k_j, k_j), k_j odd.
  dilations  J ints >= 1; candidate j is zero-padded by d_j * (k_j - 1) / 2, so
             every candidate has the output size (H - 1) // stride + 1.
  stride     1 or 2.
  activations  "relu" (default), another name of ``fastnas.ops.activations``, or J names.

The backward returns the gradient with respect to the pre-activation value (x
in the shared case, summed over candidates; ``(x - mean) * rstd`` per candidate
otherwise), already multiplied by the activation's derivative (for ReLU, masked
by ``pre > 0``), and the weights' gradients, reduced in a fixed order so reruns
are bit-identical.

Ops registered with torch.library:
  fastnas::multi_depthwise / multi_depthwise_backward                 C++ (CPU, CUDA)
  fastnas::multi_depthwise_triton / multi_depthwise_backward_triton   Triton kernels
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastnas import backends
from fastnas.ops._common import (
    accumulate_dtype,
    check_device,
    check_devices,
    check_dtype,
    check_dtypes,
    check_int_list,
    check_same_dtype,
    check_tensor,
    check_tensor_list,
    check_type,
    check_value,
    is_int,
)
from fastnas.ops._registry import register_op
from fastnas.ops.activations import ACTIVATIONS, activation_code, apply_activation

# The Triton kernels take the candidates' weights through a fixed number of
# pointer slots.
MAX_CANDIDATES_TRITON = 4
# The CPU kernel keeps each candidate's tap offsets in fixed-size arrays.
MAX_KERNEL_SIZE = 15


def _out_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


def _padding(weight: torch.Tensor, dilation: int) -> int:
    return dilation * (weight.shape[-1] - 1) // 2


# --- the eager reference, the oracle ----------------------------------------------


def _pre_activation(x, mean, rstd):
    """The pre-ReLU value in the accumulation dtype: x, or (x - mean) * rstd per candidate."""
    acc = accumulate_dtype(x.dtype)
    pre = x.to(acc)
    if mean is not None:
        pre = (pre - mean.to(acc)[:, :, None, None, None]) * rstd.to(acc)[:, :, None, None, None]
    return pre


def _depthwise_stack(pre, weights, dilations, stride, shared, out_dtype, activations):
    """act_j(pre) convolved with each candidate j, stacked as (J, C, N, Ho, Wo)."""
    acc = pre.dtype
    outs = []
    for j, (w, d) in enumerate(zip(weights, dilations)):
        a_j = apply_activation(ACTIVATIONS[activations[j]], pre if shared else pre[j].transpose(0, 1))  # (N, C, H, W)
        y = F.conv2d(a_j, w.to(acc), stride=stride, padding=_padding(w, d), dilation=d, groups=a_j.shape[1])
        outs.append(y.transpose(0, 1))  # (C, N, Ho, Wo)
    return torch.stack(outs).to(out_dtype).contiguous()


def multi_depthwise_reference(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    dilations: Sequence[int],
    stride: int,
    mean: torch.Tensor | None = None,
    rstd: torch.Tensor | None = None,
    activations="relu",
) -> torch.Tensor:
    """The oracle: eager PyTorch, one ``conv2d(groups=C)`` per candidate, in fp32 (fp64 for fp64)."""
    weights, dilations = list(weights), list(dilations)
    shared = check_multi_depthwise(x, weights, dilations, stride, mean, rstd, "multi_depthwise_reference")
    codes = activation_codes("multi_depthwise_reference", activations, len(weights))
    pre = _pre_activation(x, mean, rstd)
    return _depthwise_stack(pre, weights, dilations, stride, shared, x.dtype, codes)


def multi_depthwise_backward_reference(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    dilations: Sequence[int],
    stride: int,
    mean: torch.Tensor | None = None,
    rstd: torch.Tensor | None = None,
    input_need_grad: bool = True,
    activations="relu",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The oracle of the backward: autograd through the reference.

    Returns (grad_pre, grad_weights); grad_pre is the gradient with respect to
    the pre-activation value (an empty tensor when ``input_need_grad`` is False).
    """
    weights, dilations = list(weights), list(dilations)
    shared = check_multi_depthwise_backward(
        grad_out, x, weights, dilations, stride, mean, rstd, input_need_grad, "multi_depthwise_backward_reference"
    )
    codes = activation_codes("multi_depthwise_backward_reference", activations, len(weights))
    acc = accumulate_dtype(x.dtype)
    with torch.enable_grad():
        pre = _pre_activation(x.detach(), mean, rstd).requires_grad_(True)
        ws = [w.detach().to(acc).requires_grad_(True) for w in weights]
        out = _depthwise_stack(pre, ws, dilations, stride, shared, acc, codes)
        grads = torch.autograd.grad(out, [pre, *ws], grad_out.to(acc))
    grad_pre = grads[0].to(x.dtype).contiguous() if input_need_grad else x.new_empty(0)
    grad_ws = [g.to(w.dtype) for g, w in zip(grads[1:], weights)]
    return grad_pre, grad_ws


# --- argument checks ----------------------------------------------------------------


def activation_codes(op: str, activations, num: int) -> list[int]:
    """The kernels' codes of ``activations``: one name for all ``num`` candidates, or one name each."""
    if isinstance(activations, str):
        activations = [activations] * num
    elif isinstance(activations, torch.Tensor) or not isinstance(activations, Sequence):
        raise TypeError(f"{op}: activations must be a name or a list of names, got {type(activations).__name__}")
    activations = list(activations)
    if len(activations) != num:
        raise ValueError(f"{op}: activations has {len(activations)} entries but weights has {num}")
    try:
        return [activation_code(a) for a in activations]
    except ValueError as exc:
        raise ValueError(f"{op}: {exc}") from None


def check_activation_codes(op: str, codes, num: int) -> None:
    """The ops' ``activations`` argument: empty (ReLU) or one code of ``fastnas.ops.activations`` per candidate."""
    codes = check_int_list(op, "activations", codes)
    check_value(len(codes) in (0, num), lambda: f"{op}: activations has {len(codes)} entries but weights has {num}")

    def message():
        j = next(j for j, c in enumerate(codes) if not 0 <= c < len(ACTIVATIONS))
        return f"{op}: activations[{j}] is {codes[j]}; activation codes run from 0 to {len(ACTIVATIONS) - 1}"

    check_value(all(0 <= c < len(ACTIVATIONS) for c in codes), message)


def check_multi_depthwise(x, weights, dilations, stride, mean, rstd, op: str = "multi_depthwise") -> bool:
    """The arguments of ``multi_depthwise``; returns whether x is shared by all candidates."""
    check_tensor(op, "x", x)
    check_dtype(op, "x", x)
    check_value(
        x.dim() in (4, 5),
        lambda: (
            f"{op}: x must be (N, C, H, W) shared by all candidates or (J, C, N, H, W) per candidate, "
            f"got shape {tuple(x.shape)}"
        ),
    )
    shared = x.dim() == 4
    weights = check_tensor_list(op, "weights", weights, "a list of tensors")
    num = len(weights)
    check_value(num > 0, lambda: f"{op}: weights is empty; it needs at least one candidate")
    dilations = check_int_list(op, "dilations", dilations)
    check_value(len(dilations) == num, lambda: f"{op}: dilations has {len(dilations)} entries but weights has {num}")
    check_value(is_int(stride) and stride in (1, 2), lambda: f"{op}: stride must be 1 or 2, got {stride!r}")
    channels = x.shape[1]
    check_value(
        shared or x.shape[0] == num, lambda: f"{op}: x has {x.shape[0]} candidates (dim 0) but weights has {num}"
    )

    def shape_ok(w):
        return w.dim() == 4 and w.shape[0] == channels and w.shape[1] == 1 and w.shape[2] == w.shape[3]

    def first(ok):
        return next(j for j, w in enumerate(weights) if not ok(w))

    def shape_message():
        j = first(shape_ok)
        return (
            f"{op}: weights[{j}] must be ({channels}, 1, k, k) for x's {channels} channels, "
            f"got shape {tuple(weights[j].shape)}"
        )

    def even_message():
        j = first(lambda w: w.shape[2] % 2 == 1)
        return f"{op}: weights[{j}] has an even kernel size {weights[j].shape[2]}; it must be odd"

    def size_message():
        j = first(lambda w: w.shape[2] <= MAX_KERNEL_SIZE)
        return f"{op}: weights[{j}] has kernel size {weights[j].shape[2]}; at most {MAX_KERNEL_SIZE} is supported"

    def dilation_message():
        j = next(j for j, d in enumerate(dilations) if not (is_int(d) and d >= 1))
        return f"{op}: dilations[{j}] must be an int >= 1, got {dilations[j]!r}"

    check_value(all(shape_ok(w) for w in weights), shape_message)
    check_value(all(w.shape[2] % 2 == 1 for w in weights), even_message)
    check_value(all(w.shape[2] <= MAX_KERNEL_SIZE for w in weights), size_message)
    check_dtypes(op, "weights", weights, "x", x.dtype)
    check_devices(op, "weights", weights, "x is", x.device)
    check_value(all(is_int(d) and d >= 1 for d in dilations), dilation_message)
    check_value(
        (mean is None) == (rstd is None),
        lambda: f"{op}: mean and rstd must be given together (got only {'mean' if rstd is None else 'rstd'})",
    )
    if mean is not None:
        check_value(
            not shared,
            lambda: (
                f"{op}: mean/rstd need a per-candidate x of shape (J, C, N, H, W); x is shared, shape {tuple(x.shape)}"
            ),
        )
        for name, t in (("mean", mean), ("rstd", rstd)):
            check_tensor(op, name, t)
            check_value(
                tuple(t.shape) == (num, channels),
                lambda: f"{op}: {name} must have shape ({num}, {channels}), got {tuple(t.shape)}",
            )
            check_type(t.dtype == torch.float32, lambda: f"{op}: {name} must be float32, got {t.dtype}")
            check_device(op, name, t, "x is", x.device)
    return shared


def _output_shape(x, num, stride, shared) -> tuple[int, ...]:
    if shared:
        n, c, h, w = x.shape
    else:
        _, c, n, h, w = x.shape
    return (num, c, n, _out_size(h, stride), _out_size(w, stride))


def _check_grad_out(op, grad_out, x, weights, stride, shared):
    check_tensor(op, "grad_out", grad_out)
    want = _output_shape(x, len(weights), stride, shared)
    check_value(
        tuple(grad_out.shape) == want, lambda: f"{op}: grad_out has shape {tuple(grad_out.shape)}; expected {want}"
    )
    check_same_dtype(op, "grad_out", grad_out, "x", x.dtype)
    check_device(op, "grad_out", grad_out, "x is", x.device)


def check_multi_depthwise_backward(
    grad_out, x, weights, dilations, stride, mean, rstd, input_need_grad, op: str = "multi_depthwise_backward"
) -> bool:
    shared = check_multi_depthwise(x, weights, dilations, stride, mean, rstd, op)
    _check_grad_out(op, grad_out, x, weights, stride, shared)
    return shared


def check_triton_candidates(num: int) -> None:
    """The Triton kernels' pointer slots bound the candidates of one call."""
    check_value(
        num <= MAX_CANDIDATES_TRITON,
        lambda: (
            f"multi_depthwise: the triton backend takes at most {MAX_CANDIDATES_TRITON} candidates per call, got {num}"
        ),
    )


# --- the public ops -------------------------------------------------------------------


def _backend(device: torch.device, backend: str | None, num: int) -> str:
    name = backends.resolve("multi_depthwise", device, backend)
    if name == "triton":
        check_triton_candidates(num)
    return name


def multi_depthwise(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    dilations: Sequence[int],
    stride: int,
    mean: torch.Tensor | None = None,
    rstd: torch.Tensor | None = None,
    *,
    activations="relu",
    backend: str | None = None,
) -> torch.Tensor:
    """J depthwise convolutions of act(x) (or act((x - mean) * rstd)), as (J, C, N, Ho, Wo);
    ``activations``: one name of ``fastnas.ops.activations`` for all, or one per candidate."""
    weights, dilations = list(weights), list(dilations)
    shared = check_multi_depthwise(x, weights, dilations, stride, mean, rstd)
    codes = activation_codes("multi_depthwise", activations, len(weights))
    name = _backend(x.device, backend, len(weights))
    if name == "reference":
        return multi_depthwise_reference(x, weights, dilations, stride, mean, rstd, codes_to_names(codes))
    x = x.contiguous() if shared or not x.is_contiguous() else x
    if name == "triton":
        return torch.ops.fastnas.multi_depthwise_triton(x, weights, dilations, stride, mean, rstd, codes)
    return torch.ops.fastnas.multi_depthwise(x, weights, dilations, stride, mean, rstd, codes)


def multi_depthwise_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    dilations: Sequence[int],
    stride: int,
    mean: torch.Tensor | None = None,
    rstd: torch.Tensor | None = None,
    input_need_grad: bool = True,
    *,
    activations="relu",
    backend: str | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(grad_pre, grad_weights) of ``multi_depthwise``; see the module docstring."""
    weights, dilations = list(weights), list(dilations)
    check_multi_depthwise_backward(grad_out, x, weights, dilations, stride, mean, rstd, input_need_grad)
    codes = activation_codes("multi_depthwise_backward", activations, len(weights))
    name = _backend(x.device, backend, len(weights))
    input_need_grad = bool(input_need_grad)
    if name == "reference":
        return multi_depthwise_backward_reference(
            grad_out, x, weights, dilations, stride, mean, rstd, input_need_grad, codes_to_names(codes)
        )
    x, grad_out = x.contiguous(), grad_out.contiguous()
    if name == "triton":
        op = torch.ops.fastnas.multi_depthwise_backward_triton
    else:
        op = torch.ops.fastnas.multi_depthwise_backward
    grad_pre, grad_ws = op(grad_out, x, weights, dilations, stride, mean, rstd, input_need_grad, codes)
    return grad_pre, list(grad_ws)


def codes_to_names(codes) -> list[str]:
    return [ACTIVATIONS[c] for c in codes]


# --- fake implementations, autograd ---------------------------------------------------


def _fake_forward(x, weights, dilations, stride, mean, rstd, activations=()):
    check_multi_depthwise(x, weights, dilations, stride, mean, rstd)
    check_activation_codes("multi_depthwise", activations, len(weights))
    shape = _output_shape(x, len(weights), stride, x.dim() == 4)
    return x.new_empty(shape)


def _fake_backward(grad_out, x, weights, dilations, stride, mean, rstd, input_need_grad, activations=()):
    check_multi_depthwise_backward(grad_out, x, weights, dilations, stride, mean, rstd, input_need_grad)
    check_activation_codes("multi_depthwise_backward", activations, len(weights))
    grad_pre = x.new_empty(x.shape) if input_need_grad else x.new_empty(0)
    return grad_pre, [w.new_empty(w.shape) for w in weights]


def _setup_context(ctx, inputs, output):
    x, weights, dilations, stride, mean, rstd, activations = inputs
    ctx.dilations, ctx.stride, ctx.activations = list(dilations), stride, list(activations or [])
    ctx.has_bn = mean is not None
    ctx.save_for_backward(x, mean, rstd, *weights)


def _make_backward(backward_op):
    def backward(ctx, grad_out):
        x, mean, rstd, *weights = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0] or (ctx.has_bn and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5]))
        grad_pre, grad_ws = backward_op(
            grad_out.contiguous(), x, weights, ctx.dilations, ctx.stride, mean, rstd, bool(need_x), ctx.activations
        )
        grad_x = grad_mean = grad_rstd = None
        if ctx.has_bn and need_x:
            # pre = (x - mean) * rstd, per (j, c) row.
            acc = accumulate_dtype(x.dtype)
            g = grad_pre.to(acc)
            r = rstd.to(acc)[:, :, None, None, None]
            if ctx.needs_input_grad[0]:
                grad_x = (g * r).to(x.dtype)
            if ctx.needs_input_grad[4]:
                grad_mean = (-(g.sum((2, 3, 4)) * rstd.to(acc))).to(mean.dtype)
            if ctx.needs_input_grad[5]:
                grad_rstd = (g * (x.to(acc) - mean.to(acc)[:, :, None, None, None])).sum((2, 3, 4)).to(rstd.dtype)
        elif ctx.needs_input_grad[0]:
            grad_x = grad_pre
        return grad_x, list(grad_ws), None, None, grad_mean, grad_rstd, None

    return backward


# Opaque custom ops around the Triton launches: the launch code picks constexpr
# kernel sizes and dilations per candidate slot on the host.
@torch.library.custom_op("fastnas::multi_depthwise_triton", mutates_args=())
def _multi_depthwise_triton(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    dilations: list[int],
    stride: int,
    mean: torch.Tensor | None,
    rstd: torch.Tensor | None,
    activations: list[int] | None = None,
) -> torch.Tensor:
    from fastnas.kernels.multi_depthwise import multi_depthwise_forward

    return multi_depthwise_forward(
        x.contiguous(), [w.contiguous() for w in weights], list(dilations), stride,
        None if mean is None else mean.contiguous(), None if rstd is None else rstd.contiguous(),
        list(activations or []),
    )  # fmt: skip


@torch.library.custom_op("fastnas::multi_depthwise_backward_triton", mutates_args=())
def _multi_depthwise_backward_triton(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weights: list[torch.Tensor],
    dilations: list[int],
    stride: int,
    mean: torch.Tensor | None,
    rstd: torch.Tensor | None,
    input_need_grad: bool,
    activations: list[int] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    from fastnas.kernels.multi_depthwise import multi_depthwise_backward as backward

    return backward(
        grad_out.contiguous(), x.contiguous(), [w.contiguous() for w in weights], list(dilations), stride,
        None if mean is None else mean.contiguous(), None if rstd is None else rstd.contiguous(), input_need_grad,
        list(activations or []),
    )  # fmt: skip


def _fake_forward_triton(x, weights, dilations, stride, mean, rstd, activations=None):
    check_triton_candidates(len(weights))
    return _fake_forward(x, weights, dilations, stride, mean, rstd, activations or ())


def _fake_backward_triton(grad_out, x, weights, dilations, stride, mean, rstd, input_need_grad, activations=None):
    check_triton_candidates(len(weights))
    return _fake_backward(grad_out, x, weights, dilations, stride, mean, rstd, input_need_grad, activations or ())


register_op(
    "multi_depthwise",
    _fake_forward,
    fake_backward=_fake_backward,
    setup_context=_setup_context,
    make_backward=_make_backward,
    triton=_multi_depthwise_triton,
    triton_backward=_multi_depthwise_backward_triton,
    triton_fakes=(_fake_forward_triton, _fake_backward_triton),
)
