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
  fastnas::multi_depthwise / multi_depthwise_backward                 C++ (CPU kernel)
  fastnas::multi_depthwise_triton / multi_depthwise_backward_triton   Triton kernels
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastnas import backends
from fastnas.ops.activations import ACTIVATIONS, activation_code, apply_activation

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DTYPE_NAMES = "float32, float64, float16 or bfloat16"
# The Triton kernels take the candidates' weights through a fixed number of
# pointer slots.
MAX_CANDIDATES_TRITON = 4
# The CPU kernel keeps each candidate's tap offsets in fixed-size arrays.
MAX_KERNEL_SIZE = 15


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _out_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


def _padding(weight: torch.Tensor, dilation: int) -> int:
    return dilation * (weight.shape[-1] - 1) // 2


# --- the eager reference, the oracle ----------------------------------------------


def _pre_activation(x, mean, rstd):
    """The pre-ReLU value in the accumulation dtype: x, or (x - mean) * rstd per candidate."""
    acc = _acc_dtype(x.dtype)
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
    shared = _check("multi_depthwise_reference", x, weights, dilations, stride, mean, rstd)
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
    shared = _check("multi_depthwise_backward_reference", x, weights, dilations, stride, mean, rstd)
    _check_grad_out("multi_depthwise_backward_reference", grad_out, x, weights, stride, shared)
    codes = activation_codes("multi_depthwise_backward_reference", activations, len(weights))
    acc = _acc_dtype(x.dtype)
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


def _check(op, x, weights, dilations, stride, mean, rstd) -> bool:
    """Validate the arguments; return whether x is shared by all candidates."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{op}: x has dtype {x.dtype}; expected {_DTYPE_NAMES}")
    if x.dim() not in (4, 5):
        raise ValueError(
            f"{op}: x must be (N, C, H, W) shared by all candidates or (J, C, N, H, W) per candidate, "
            f"got shape {tuple(x.shape)}"
        )
    shared = x.dim() == 4
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence):
        raise TypeError(f"{op}: weights must be a list of tensors, got {type(weights).__name__}")
    num = len(weights)
    if num == 0:
        raise ValueError(f"{op}: weights is empty; it needs at least one candidate")
    if isinstance(dilations, torch.Tensor) or not isinstance(dilations, Sequence):
        raise TypeError(f"{op}: dilations must be a list of ints, got {type(dilations).__name__}")
    if len(dilations) != num:
        raise ValueError(f"{op}: dilations has {len(dilations)} entries but weights has {num}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride not in (1, 2):
        raise ValueError(f"{op}: stride must be 1 or 2, got {stride!r}")
    channels = x.shape[1]
    if not shared and x.shape[0] != num:
        raise ValueError(f"{op}: x has {x.shape[0]} candidates (dim 0) but weights has {num}")
    for j, (w, d) in enumerate(zip(weights, dilations)):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{op}: weights[{j}] is a {type(w).__name__}, not a tensor")
        if w.dim() != 4 or w.shape[0] != channels or w.shape[1] != 1 or w.shape[2] != w.shape[3]:
            raise ValueError(
                f"{op}: weights[{j}] must be ({channels}, 1, k, k) for x's {channels} channels, "
                f"got shape {tuple(w.shape)}"
            )
        if w.shape[2] % 2 == 0:
            raise ValueError(f"{op}: weights[{j}] has an even kernel size {w.shape[2]}; it must be odd")
        if w.shape[2] > MAX_KERNEL_SIZE:
            raise ValueError(f"{op}: weights[{j}] has kernel size {w.shape[2]}; at most {MAX_KERNEL_SIZE} is supported")
        if w.dtype != x.dtype:
            raise TypeError(f"{op}: weights[{j}] has dtype {w.dtype} but x has dtype {x.dtype}")
        if w.device != x.device:
            raise ValueError(f"{op}: weights[{j}] is on {w.device} but x is on {x.device}")
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"{op}: dilations[{j}] must be an int >= 1, got {d!r}")
    if (mean is None) != (rstd is None):
        raise ValueError(f"{op}: mean and rstd must be given together (got only {'mean' if rstd is None else 'rstd'})")
    if mean is not None:
        if shared:
            raise ValueError(
                f"{op}: mean/rstd need a per-candidate x of shape (J, C, N, H, W); x is shared, shape {tuple(x.shape)}"
            )
        for name, t in (("mean", mean), ("rstd", rstd)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != (num, channels):
                raise ValueError(f"{op}: {name} must have shape ({num}, {channels}), got {tuple(t.shape)}")
            if t.dtype != torch.float32:
                raise TypeError(f"{op}: {name} must be float32, got {t.dtype}")
            if t.device != x.device:
                raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    return shared


def _output_shape(x, num, stride, shared) -> tuple[int, ...]:
    if shared:
        n, c, h, w = x.shape
    else:
        _, c, n, h, w = x.shape
    return (num, c, n, _out_size(h, stride), _out_size(w, stride))


def _check_grad_out(op, grad_out, x, weights, stride, shared):
    if not isinstance(grad_out, torch.Tensor):
        raise TypeError(f"{op}: grad_out must be a tensor, got {type(grad_out).__name__}")
    want = _output_shape(x, len(weights), stride, shared)
    if tuple(grad_out.shape) != want:
        raise ValueError(f"{op}: grad_out has shape {tuple(grad_out.shape)}; expected {want}")
    if grad_out.dtype != x.dtype:
        raise TypeError(f"{op}: grad_out has dtype {grad_out.dtype} but x has dtype {x.dtype}")
    if grad_out.device != x.device:
        raise ValueError(f"{op}: grad_out is on {grad_out.device} but x is on {x.device}")


# --- the public ops -------------------------------------------------------------------


def _backend(device: torch.device, backend: str | None, num: int) -> str:
    name = backends.resolve("multi_depthwise", device, backend)
    if name == "triton" and num > MAX_CANDIDATES_TRITON:
        raise ValueError(
            f"multi_depthwise: the triton backend takes at most {MAX_CANDIDATES_TRITON} candidates per call, got {num}"
        )
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
    shared = _check("multi_depthwise", x, weights, dilations, stride, mean, rstd)
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
    shared = _check("multi_depthwise_backward", x, weights, dilations, stride, mean, rstd)
    _check_grad_out("multi_depthwise_backward", grad_out, x, weights, stride, shared)
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
    shape = _output_shape(x, len(weights), stride, x.dim() == 4)
    return x.new_empty(shape)


def _fake_backward(grad_out, x, weights, dilations, stride, mean, rstd, input_need_grad, activations=()):
    grad_pre = x.new_empty(x.shape) if input_need_grad else x.new_empty(0)
    return grad_pre, [w.new_empty(w.shape) for w in weights]


def _setup_context(ctx, inputs, output):
    x, weights, dilations, stride, mean, rstd, activations = inputs
    ctx.dilations, ctx.stride, ctx.activations = list(dilations), stride, list(activations)
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
            acc = _acc_dtype(x.dtype)
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


def _register_cpp():
    if not backends.register_cpp("multi_depthwise", "multi_depthwise_backward"):
        return
    torch.library.register_fake("fastnas::multi_depthwise")(_fake_forward)
    torch.library.register_fake("fastnas::multi_depthwise_backward")(_fake_backward)
    torch.library.register_autograd(
        "fastnas::multi_depthwise",
        _make_backward(torch.ops.fastnas.multi_depthwise_backward),
        setup_context=_setup_context,
    )


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
    activations: list[int],
) -> torch.Tensor:
    from fastnas.kernels.multi_depthwise import multi_depthwise_forward

    return multi_depthwise_forward(
        x.contiguous(), [w.contiguous() for w in weights], list(dilations), stride,
        None if mean is None else mean.contiguous(), None if rstd is None else rstd.contiguous(), list(activations),
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
    activations: list[int],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    from fastnas.kernels.multi_depthwise import multi_depthwise_backward as backward

    return backward(
        grad_out.contiguous(), x.contiguous(), [w.contiguous() for w in weights], list(dilations), stride,
        None if mean is None else mean.contiguous(), None if rstd is None else rstd.contiguous(), input_need_grad,
        list(activations),
    )  # fmt: skip


_multi_depthwise_triton.register_fake(_fake_forward)
_multi_depthwise_backward_triton.register_fake(_fake_backward)
_multi_depthwise_triton.register_autograd(
    _make_backward(_multi_depthwise_backward_triton), setup_context=_setup_context
)
_register_cpp()
backends.register("multi_depthwise", "triton")
