"""A DARTS cell's input preprocessing as one op that keeps only its input for backward.

  relu_conv_bn(x, weights, running_mean, running_var, num_batches_tracked, eps, momentum) -> out
      ReLU, then one 1x1 convolution (``weights`` = [w], DARTS' ReLUConvBN) or two
      stride-2 1x1 convolutions of the input and of the input shifted by one pixel,
      concatenated along the channels (``weights`` = [w1, w2], FactorizedReduce), then
      a batch norm without affine parameters in training mode, which updates the
      running statistics in place as ``nn.BatchNorm2d`` does.

Backward recomputes the convolution from ``x`` and runs the ATen backward kernels that
eager autograd runs, so the gradients are eager's; what it saves against
``torch.utils.checkpoint`` of the same modules is that machinery's host time (the
preprocessing runs twice per cell and step).

Ops registered with torch.library:
  fastnas::relu_conv_bn / relu_conv_bn_backward   C++ (CPU, CUDA), one implementation of ATen calls,
                                                   with its autograd in C++ (csrc/relu_conv_bn.cpp)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastnas import backends
from fastnas.ops._common import (
    STAT_DTYPE_NAMES,
    STAT_DTYPES,
    accumulate_dtype,
    autocast_dtype,
    check_device,
    check_devices,
    check_dtype,
    check_dtypes,
    check_tensor,
    check_tensor_list,
    check_value,
)
from fastnas.ops._registry import register_op

_OP = "relu_conv_bn"


# --- the eager reference (the oracle) -------------------------------------------


def _convolve(r: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(weights) == 1:
        return F.conv2d(r, weights[0])
    return torch.cat([F.conv2d(r, weights[0], stride=2), F.conv2d(r[:, :, 1:, 1:], weights[1], stride=2)], dim=1)


def relu_conv_bn_reference(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor,
    eps: float = 1e-5,
    momentum: float = 0.1,
) -> torch.Tensor:
    """What ``ReLUConvBN`` / ``FactorizedReduce`` (non-affine batch norm) compute in training mode."""
    out = F.batch_norm(
        _convolve(torch.relu(x), weights), running_mean, running_var, training=True, momentum=momentum, eps=eps
    )
    num_batches_tracked.add_(1)
    return out


# --- argument checks ----------------------------------------------------------------


def _check_inputs(op: str, x, weights) -> list[torch.Tensor]:
    check_tensor(op, "x", x)
    check_value(x.dim() == 4, lambda: f"{op}: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    check_dtype(op, "x", x)
    weights = check_tensor_list(op, "weights", weights)
    check_value(
        len(weights) in (1, 2),
        lambda: f"{op}: weights must be one 1x1 convolution weight, or two (a factorized reduce); got {len(weights)}",
    )
    C = x.shape[1]
    for i, w in enumerate(weights):
        check_value(
            w.dim() == 4 and w.shape[1] == C and w.shape[2] == 1 and w.shape[3] == 1,
            lambda i=i, w=w: (
                f"{op}: weights[{i}] must be (C_out, {C}, 1, 1) for x of {C} channels, got shape {tuple(w.shape)}"
            ),
        )
    check_dtypes(op, "weights", weights, "x", x.dtype)
    check_devices(op, "weights", weights, "x is", x.device)
    if len(weights) == 2:
        check_value(
            x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0,
            lambda: f"{op}: a factorized reduce needs even H and W, got {x.shape[2]}x{x.shape[3]}",
        )
    return weights


def _out_shape(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> tuple[int, ...]:
    N, _, H, W = x.shape
    if len(weights) == 1:
        return (N, weights[0].shape[0], H, W)
    return (N, weights[0].shape[0] + weights[1].shape[0], H // 2, W // 2)


def _check_stat(op: str, name: str, t, c_out: int, device: torch.device) -> None:
    check_tensor(op, name, t)
    check_value(
        t.dim() == 1 and t.shape[0] == c_out,
        lambda: f"{op}: {name} must have {c_out} entries (the output channels), got shape {tuple(t.shape)}",
    )
    check_dtype(op, name, t, STAT_DTYPES, STAT_DTYPE_NAMES)
    check_device(op, name, t, "x is", device)


def check_relu_conv_bn(x, weights, running_mean, running_var, num_batches_tracked) -> list[torch.Tensor]:
    weights = _check_inputs(_OP, x, weights)
    shape = _out_shape(x, weights)
    _check_stat(_OP, "running_mean", running_mean, shape[1], x.device)
    _check_stat(_OP, "running_var", running_var, shape[1], x.device)
    check_tensor(_OP, "num_batches_tracked", num_batches_tracked)
    check_value(
        num_batches_tracked.numel() == 1,
        lambda: f"{_OP}: num_batches_tracked must hold one count, got shape {tuple(num_batches_tracked.shape)}",
    )
    check_value(
        shape[0] * shape[2] * shape[3] > 1,
        lambda: f"{_OP}: batch norm in training needs more than one value per channel, got output shape {shape}",
    )
    return weights


# --- the public op ---------------------------------------------------------------


def relu_conv_bn(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor,
    eps: float = 1e-5,
    momentum: float = 0.1,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """ReLU, 1x1 convolution(s), training-mode batch norm without affine parameters; see the module doc.

    Under autocast the convolution runs in autocast's dtype, as the modules' would, on
    cast copies of ``x`` and the weights; the running statistics stay in their dtype.
    """
    cast = autocast_dtype(x)
    if cast is not None:
        with torch.autocast(x.device.type, enabled=False):
            return relu_conv_bn(
                x.to(cast), [w.to(cast) for w in weights], running_mean, running_var, num_batches_tracked, eps,
                momentum, backend=backend,
            )  # fmt: skip
    weights = check_relu_conv_bn(x, weights, running_mean, running_var, num_batches_tracked)
    if backends.resolve(_OP, x.device, backend) in _CPP_BACKENDS:
        return torch.ops.fastnas.relu_conv_bn(
            x, weights, running_mean, running_var, num_batches_tracked, eps, momentum
        )[0]
    return relu_conv_bn_reference(x, weights, running_mean, running_var, num_batches_tracked, eps, momentum)


# --- the C++ op: fake implementations ------------------------------------------------------


def _fake_forward(x, weights, running_mean, running_var, num_batches_tracked, eps, momentum):
    weights = check_relu_conv_bn(x, weights, running_mean, running_var, num_batches_tracked)
    shape = _out_shape(x, weights)
    acc = accumulate_dtype(x.dtype)
    return x.new_empty(shape), x.new_empty(shape[1], dtype=acc), x.new_empty(shape[1], dtype=acc)


def _fake_backward(grad_out, x, weights, mean, rstd, eps):
    op = f"{_OP}_backward"
    weights = _check_inputs(op, x, weights)
    shape = _out_shape(x, weights)
    check_tensor(op, "grad_out", grad_out)
    check_value(
        tuple(grad_out.shape) == shape,
        lambda: f"{op}: grad_out has shape {tuple(grad_out.shape)} but the output has shape {shape}",
    )
    for name, t in (("mean", mean), ("rstd", rstd)):
        _check_stat(op, name, t, shape[1], x.device)
    return torch.empty_like(x), [torch.empty_like(w) for w in weights]


_CPP_BACKENDS = register_op(_OP, _fake_forward, fake_backward=_fake_backward)
